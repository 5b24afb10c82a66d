/* synth.c - placeholder until the synthetic-model module lands. */
#include "config.h"
#include "synth.h"

moecal_status moecal_synth_preset(const char *dir, const char *preset)
{
    return moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: the %s preset cannot be written: "
                            "'moecal synth' is not built yet", dir, preset);
}
