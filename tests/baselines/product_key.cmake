# tests of pkm, peer: omnimoe_add_test(test_baselines_pk LABEL cpu ...) and a cuda one
