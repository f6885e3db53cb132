# tests of dispatch, dense, gshard, deepseekmoe: omnimoe_add_test(test_baselines_coarse LABEL cpu ...) and a cuda one
