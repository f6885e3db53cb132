#include <gtest/gtest.h>
TEST(Placeholder, test_gradients) { SUCCEED(); }
