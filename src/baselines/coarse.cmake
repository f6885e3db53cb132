# dispatch, dense, gshard, deepseekmoe (see sources.cmake)
