// placeholder: src/cpu/shared_mlp.cpp
