/* cmd_topo.c - placeholder until its module lands (its owner replaces this file). */
#include "config.h"
#include "commands.h"
#include "error.h"
#include "runtime.h"

int moecal_cmd_topo(int argc, char **argv)
{
    (void)argc; (void)argv;
    moecal_error_set(MOECAL_ERR_UNSUPPORTED, "'moecal topo' is not built yet");
    moecal_fatal_all(MOECAL_ERR_UNSUPPORTED);
}
