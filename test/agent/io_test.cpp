#include "agent_fixture.hpp"
