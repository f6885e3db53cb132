# pkm, peer (see sources.cmake)
