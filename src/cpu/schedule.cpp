// placeholder: src/cpu/schedule.cpp
