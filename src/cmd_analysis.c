/* cmd_analysis.c - `moecal compare` and `moecal report` (post-hoc analysis of
 * amax files).  Not available yet in this version: both refuse clearly. */
#include "config.h"

#include "commands.h"
#include "error.h"
#include "runtime.h"

int moecal_cmd_compare(int argc, char **argv)
{
    (void)argc; (void)argv;
    moecal_error_set(MOECAL_ERR_UNSUPPORTED, "'moecal compare' is not available in moecal %s",
                     PACKAGE_VERSION);
    moecal_fatal_all(MOECAL_ERR_USAGE);
}

int moecal_cmd_report(int argc, char **argv)
{
    (void)argc; (void)argv;
    moecal_error_set(MOECAL_ERR_UNSUPPORTED, "'moecal report' is not available in moecal %s",
                     PACKAGE_VERSION);
    moecal_fatal_all(MOECAL_ERR_USAGE);
}
