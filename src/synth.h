/* synth.h - placeholder until the synthetic-model module lands. */
#ifndef MOECAL_SYNTH_H
#define MOECAL_SYNTH_H
#include "error.h"
/* Write the named preset's model and activations into dir. */
moecal_status moecal_synth_preset(const char *dir, const char *preset);
#endif
