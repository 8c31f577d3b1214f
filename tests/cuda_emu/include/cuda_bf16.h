// Stand-in for the CUDA header of the same name: see ../emu.h.
#pragma once
#include "../emu.h"
