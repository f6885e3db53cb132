// Umbrella header.
#pragma once
#include "omnimoe/config.hpp"
#include "omnimoe/layer.hpp"
#include "omnimoe/status.hpp"
#include "omnimoe/tensor.hpp"
