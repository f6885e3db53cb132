#include <gtest/gtest.h>
TEST(Placeholder, test_config) { SUCCEED(); }
