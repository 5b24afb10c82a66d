/* test_debug.c - what --enable-debug adds (error.h): the call site at the end
 * of every message, and MOECAL_ASSERT aborting with the condition and its
 * place.  Built with MOECAL_DEBUG and its own copy of src/error.c whatever
 * the configuration, so the test runs in every build. */
#include "config.h"
#ifndef MOECAL_DEBUG
#define MOECAL_DEBUG 1
#endif

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "error.h"

static void test_call_site(void **state)
{
    (void)state;
    int line = __LINE__ + 1;
    moecal_status s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: bad", "x.json");
    char want[64];
    assert_int_equal(s, MOECAL_ERR_FORMAT);
    snprintf(want, sizeof want, "x.json: bad [%s:%d]", __FILE__, line);
    assert_string_equal(moecal_error_message(), want);

    line = __LINE__ + 1;
    s = moecal_error_errno(ENOENT, "%s: cannot open", "y.h5");
    assert_int_equal(s, MOECAL_ERR_IO);
    snprintf(want, sizeof want, "[%s:%d]", __FILE__, line);
    assert_non_null(strstr(moecal_error_message(), want));
    assert_non_null(strstr(moecal_error_message(), "y.h5: cannot open: "));

    /* a prefix goes in front; the place stays at the end */
    moecal_error_prefix("rank file: ");
    assert_true(strncmp(moecal_error_message(), "rank file: y.h5", 15) == 0);
}

static void test_assert(void **state)
{
    (void)state;
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], STDERR_FILENO);
        int n = 3;
        MOECAL_ASSERT(n == 3);       /* holds: nothing happens */
        MOECAL_ASSERT(n < 2);        /* aborts */
        _exit(0);
    }
    close(fds[1]);
    char buf[512] = "";
    ssize_t got = read(fds[0], buf, sizeof buf - 1);
    buf[got > 0 ? got : 0] = '\0';
    close(fds[0]);
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
    assert_non_null(strstr(buf, "assertion 'n < 2' failed at "));
    assert_non_null(strstr(buf, "test_debug.c:"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_call_site),
        cmocka_unit_test(test_assert),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
