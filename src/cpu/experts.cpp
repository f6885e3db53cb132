// placeholder: src/cpu/experts.cpp
