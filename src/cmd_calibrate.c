/* cmd_calibrate.c - `moecal calibrate`: options, then the calibration job. */
#include "config.h"

#include <stdio.h>

#include "calibrate_opts.h"
#include "commands.h"
#include "runtime.h"

static const char summary[] =
    "Calibrate the input and weight amax of every routed expert of a MoE model.\n"
    "Ranks share the experts of each layer; tokens are routed by the model's router.";

int moecal_cmd_calibrate(int argc, char **argv)
{
    moecal_opts *o = NULL;
    moecal_status s;

    s = moecal_opts_parse("calibrate", moecal_calibrate_optdefs, NULL, argc, argv, &o);
    if (s != MOECAL_OK)
        moecal_fatal_all(s);
    if (moecal_opts_help(o)) {
        if (moecal_world_rank() == 0)
            moecal_opts_usage("calibrate", moecal_calibrate_optdefs, NULL, summary, stdout);
        moecal_opts_free(o);
        return 0;
    }
    if (moecal_opts_print_config(o)) {
        if (moecal_world_rank() == 0)
            moecal_opts_dump(o, stdout);
        moecal_opts_free(o);
        return 0;
    }
    moecal_opts_free(o);
    moecal_error_set(MOECAL_ERR_UNSUPPORTED, "calibration engine not built yet");
    moecal_fatal_all(MOECAL_ERR_UNSUPPORTED);
}
