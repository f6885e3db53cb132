// placeholder: src/cpu/route.cpp
