// Config spellings (name / parse_*) and validation of the enum switches.
#include <gtest/gtest.h>

#include <string>

#include "omnimoe/config.hpp"

namespace omnimoe {
namespace {

Config small_config() {
  Config c;
  c.hidden = 8;
  c.grid_rows = 2;
  c.grid_cols = 3;
  c.top_k = 2;
  return c;
}

TEST(ConfigSchedule, DefaultIsAutomatic) { EXPECT_EQ(Config{}.schedule, Schedule::automatic); }

TEST(ConfigSchedule, NameAndParseRoundTrip) {
  const std::pair<Schedule, const char*> spellings[] = {
      {Schedule::automatic, "auto"}, {Schedule::expert_centric, "expert"}, {Schedule::token_centric, "token"}};
  for (const auto& [value, text] : spellings) {
    EXPECT_STREQ(name(value), text);
    const auto parsed = parse_schedule(text);
    ASSERT_TRUE(parsed.has_value()) << text;
    EXPECT_EQ(*parsed, value) << text;
  }
}

TEST(ConfigSchedule, RejectsOtherSpellings) {
  for (const char* bad : {"", "automatic", "Auto", "AUTO", "expert_centric", "token_centric", "tokens", "dense",
                          "gather", " auto", "token "})
    EXPECT_FALSE(parse_schedule(bad).has_value()) << "'" << bad << "'";
}

TEST(ConfigSchedule, ValidateAcceptsEveryScheduleAndNamesABadOne) {
  Config c = small_config();
  for (Schedule s : {Schedule::automatic, Schedule::expert_centric, Schedule::token_centric}) {
    c.schedule = s;
    EXPECT_TRUE(validate(c).ok()) << name(s);
  }
  c.schedule = static_cast<Schedule>(7);
  const Status st = validate(c);
  EXPECT_EQ(st.code(), StatusCode::invalid_argument);
  EXPECT_NE(st.message().find("config.schedule"), std::string::npos) << st.message();
}

// The other switches keep their spellings (the CLI, the file metadata and the torch ops use them).
TEST(ConfigSwitches, NameAndParseRoundTrip) {
  for (RouterNorm v : {RouterNorm::batchnorm, RouterNorm::none}) EXPECT_EQ(parse_router_norm(name(v)), v);
  for (GateKind v : {GateKind::exp, GateKind::softmax}) EXPECT_EQ(parse_gate(name(v)), v);
  for (Activation v : {Activation::silu, Activation::gelu, Activation::relu}) EXPECT_EQ(parse_activation(name(v)), v);
  EXPECT_FALSE(parse_router_norm("layernorm").has_value());
  EXPECT_FALSE(parse_gate("sigmoid").has_value());
  EXPECT_FALSE(parse_activation("tanh").has_value());
}

}  // namespace
}  // namespace omnimoe
