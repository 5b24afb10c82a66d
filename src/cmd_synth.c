/* cmd_synth.c - placeholder until its module lands (its owner replaces this file). */
#include "config.h"
#include "commands.h"
#include "error.h"
#include "runtime.h"

int moecal_cmd_synth(int argc, char **argv)
{
    (void)argc; (void)argv;
    moecal_error_set(MOECAL_ERR_UNSUPPORTED, "'moecal synth' is not built yet");
    moecal_fatal_all(MOECAL_ERR_UNSUPPORTED);
}
