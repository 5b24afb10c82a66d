/* test_placement.c - unit tests of comm.c and placement.c on one rank
 * (MPI singleton): topologies come from HWLOC_SYNTHETIC / HWLOC_XMLFILE. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "placement.h"

static moecal_comm comm;
static char xml_path[4096];

static void topology(const char *synthetic, const char *xml)
{
    unsetenv("HWLOC_SYNTHETIC");
    unsetenv("HWLOC_XMLFILE");
    if (synthetic)
        setenv("HWLOC_SYNTHETIC", synthetic, 1);
    if (xml)
        setenv("HWLOC_XMLFILE", xml, 1);
}

static void test_comm_single(void **state)
{
    (void)state;
    assert_int_equal(comm.size, 1);
    assert_int_equal(comm.node_size, 1);
    assert_int_equal(comm.n_nodes, 1);
    assert_int_equal(comm.node_id, 0);
    assert_true(comm.leader != MPI_COMM_NULL);
    assert_string_equal(comm.host, "unit");
}

/* CUDA_VISIBLE_DEVICES given through the options selects and orders GPUs
 * by PCI bus id. */
static void test_visible_option(void **state)
{
    moecal_place_opts opt = {false, "3"};
    moecal_placement p;
    (void)state;
    topology(NULL, xml_path);
    assert_int_equal(moecal_placement_compute(&comm, &opt, &p), MOECAL_OK);
    assert_int_equal(p.gpu, 0);
    assert_string_equal(p.gpu_busid, "0000:c3:00.0");
    assert_string_equal(p.cpuset, "16-23");
    assert_int_equal(p.numa, 2);
    assert_int_equal(p.ranks_per_gpu, 1);
    assert_int_equal(p.bound, 0);
    assert_int_equal(p.flags, 0);
    assert_string_equal(getenv("CUDA_DEVICE_ORDER"), "PCI_BUS_ID");

    opt.cuda_visible = "";
    assert_int_equal(moecal_placement_compute(&comm, &opt, &p), MOECAL_OK);
    assert_int_equal(p.gpu, -1);
    assert_string_equal(p.gpu_busid, "");
    assert_int_equal(p.ranks_per_gpu, 0);
    assert_string_equal(p.cpuset, "0-31");
    assert_int_equal(p.numa, -1);

    opt.cuda_visible = " 2 , x";
    assert_int_equal(moecal_placement_compute(&comm, &opt, &p), MOECAL_OK);
    assert_string_equal(p.gpu_busid, "0000:9d:00.0");
    assert_int_equal(p.flags, MOECAL_PLACE_VISIBLE_CUT);

    opt.cuda_visible = "MIG-1c2d";
    assert_int_equal(moecal_placement_compute(&comm, &opt, &p), MOECAL_OK);
    assert_int_equal(p.gpu, 0);
    assert_string_equal(p.gpu_busid, "");
    assert_int_equal(p.flags, MOECAL_PLACE_GPU_ORDER_UNKNOWN);
}

/* A user's CUDA_DEVICE_ORDER is replaced, and the placement says so. */
static void test_device_order(void **state)
{
    moecal_place_opts opt = {false, "0"};
    moecal_placement p;
    (void)state;
    topology(NULL, xml_path);
    setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST", 1);
    assert_int_equal(moecal_placement_compute(&comm, &opt, &p), MOECAL_OK);
    assert_int_equal(p.flags, MOECAL_PLACE_DEVICE_ORDER_SET);
    assert_string_equal(getenv("CUDA_DEVICE_ORDER"), "PCI_BUS_ID");
}

/* A cpuset list longer than the field ends with "..." at a comma. */
static void test_long_cpuset(void **state)
{
    moecal_place_opts opt = {false, NULL};
    moecal_placement p;
    char desc[1024];
    int len;
    (void)state;
    len = snprintf(desc, sizeof desc, "pack:1 core:80 pu:1(indexes=");
    for (int i = 0; i < 80; i++)
        len += snprintf(desc + len, sizeof desc - (size_t)len, "%s%d", i ? "," : "", 2 * i);
    snprintf(desc + len, sizeof desc - (size_t)len, ")");
    topology(desc, NULL);
    assert_int_equal(moecal_placement_compute(&comm, &opt, &p), MOECAL_OK);
    assert_true(strlen(p.cpuset) < sizeof p.cpuset);
    assert_true(strncmp(p.cpuset, "0,2,4,6,", 8) == 0);
    assert_string_equal(p.cpuset + strlen(p.cpuset) - 3, "...");
    assert_true(p.cpuset[strlen(p.cpuset) - 4] != ',');
}

static void test_bad_topology(void **state)
{
    moecal_place_opts opt = {false, NULL};
    moecal_placement p;
    (void)state;
    topology("pack:2 core:2", NULL);
    assert_int_equal(moecal_placement_compute(&comm, &opt, &p), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(), "HWLOC_SYNTHETIC"));
    topology(NULL, "/nonexistent/topology.xml");
    assert_int_equal(moecal_placement_compute(&comm, &opt, &p), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(), "/nonexistent/topology.xml"));
}

static void fill(moecal_placement *a, int rank, const char *host, const char *cpus, int numa,
                 int gpu, const char *bus, unsigned flags)
{
    memset(a, 0, sizeof *a);
    a->rank = rank;
    a->node_rank = rank;
    a->node_size = 2;
    snprintf(a->host, sizeof a->host, "%s", host);
    snprintf(a->cpuset, sizeof a->cpuset, "%s", cpus);
    a->numa = numa;
    a->gpu = gpu;
    snprintf(a->gpu_busid, sizeof a->gpu_busid, "%s", bus);
    a->ranks_per_gpu = gpu >= 0 ? 1 : 0;
    a->flags = flags;
}

static void test_print_and_json(void **state)
{
    moecal_placement a[2];
    char buf[4096];
    FILE *fp;
    char *json;
    size_t n;
    (void)state;
    fill(&a[0], 0, "a-rather-long-host", "0-3", 0, 0, "0000:1b:00.0",
         MOECAL_PLACE_CORES_SHARED);
    fill(&a[1], 1, "h\"q", "4-7", -1, -1, "",
         MOECAL_PLACE_CORES_SHARED | MOECAL_PLACE_BIND_FAILED);
    fp = fmemopen(buf, sizeof buf, "w");
    assert_non_null(fp);
    moecal_placement_print(fp, a, 2);
    n = (size_t)ftell(fp);
    fclose(fp);
    buf[n] = '\0';
    assert_string_equal(buf,
        "# rank  host                node_rank  cpuset  numa  gpu  bus_id        shared  bound\n"
        "#    0  a-rather-long-host          0  0-3        0    0  0000:1b:00.0       1  no\n"
        "#    1  h\"q                         1  4-7        -    -  -                  -  no\n"
        "# note: ranks 0-1: more ranks than cores on the node: ranks share cores\n"
        "# note: rank 1: binding to the planned cores failed: left as launched\n");

    json = moecal_placement_json(a, 2);
    assert_non_null(json);
    assert_string_equal(json,
        "[{\"rank\":0,\"host\":\"a-rather-long-host\",\"node_rank\":0,\"node_size\":2,"
        "\"cpuset\":\"0-3\",\"numa\":0,\"gpu\":0,\"gpu_bus_id\":\"0000:1b:00.0\","
        "\"ranks_per_gpu\":1,\"bound\":false,\"notes\":[\"cores_shared\"]},"
        "{\"rank\":1,\"host\":\"h\\\"q\",\"node_rank\":1,\"node_size\":2,\"cpuset\":\"4-7\","
        "\"numa\":null,\"gpu\":null,\"gpu_bus_id\":null,\"ranks_per_gpu\":0,\"bound\":false,"
        "\"notes\":[\"cores_shared\",\"bind_failed\"]}]");
    free(json);
}

static void test_gather(void **state)
{
    moecal_placement me, *all = NULL;
    (void)state;
    fill(&me, 0, "unit", "0", 0, -1, "", 0);
    assert_int_equal(moecal_placement_gather(&comm, &me, &all), MOECAL_OK);
    assert_non_null(all);
    assert_memory_equal(all, &me, sizeof me);
    free(all);
}

static void test_alloc(void **state)
{
    moecal_placement p;
    unsigned char *m;
    (void)state;
    fill(&p, 0, "unit", "0", 0, -1, "", 0);
    assert_null(moecal_placement_alloc(0, &p));
    m = moecal_placement_alloc(1 << 20, &p);
    assert_non_null(m);
    assert_int_equal(m[12345], 0);
    memset(m, 7, 1 << 20);
    moecal_placement_free(m, 1 << 20);
    moecal_placement_free(NULL, 0);

    /* Bound to this system, when it allows binding: memory on the rank's node. */
    {
        moecal_place_opts opt = {true, ""};
        topology(NULL, NULL);
        assert_int_equal(moecal_placement_compute(&comm, &opt, &p), MOECAL_OK);
        m = moecal_placement_alloc(3 * 4096 + 1, &p);
        assert_non_null(m);
        memset(m, 1, 3 * 4096 + 1);
        moecal_placement_free(m, 3 * 4096 + 1);
        moecal_placement_cleanup();
    }
}

int main(int argc, char **argv)
{
    const char *srcdir = getenv("srcdir");
    int rc;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_comm_single),
        cmocka_unit_test(test_visible_option),
        cmocka_unit_test(test_device_order),
        cmocka_unit_test(test_long_cpuset),
        cmocka_unit_test(test_bad_topology),
        cmocka_unit_test(test_print_and_json),
        cmocka_unit_test(test_gather),
        cmocka_unit_test(test_alloc),
    };

    snprintf(xml_path, sizeof xml_path, "%s/tests/topo/2pkg-4gpu.xml", srcdir ? srcdir : ".");
    unsetenv("MOECAL_FAKE_NODES");
    unsetenv("CUDA_DEVICE_ORDER");
    unsetenv("HWLOC_COMPONENTS");
    unsetenv("HWLOC_FSROOT");
    unsetenv("HWLOC_CPUID_PATH");
    unsetenv("HWLOC_THISSYSTEM");
    setenv("MOECAL_HOSTNAME", "unit", 1);
    if (MPI_Init(&argc, &argv) != MPI_SUCCESS)
        return 1;
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    if (moecal_comm_init(MPI_COMM_WORLD, &comm) != MOECAL_OK) {
        fprintf(stderr, "moecal_comm_init: %s\n", moecal_error_message());
        MPI_Finalize();
        return 1;
    }
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    moecal_comm_free(&comm);
    MPI_Finalize();
    return rc;
}
