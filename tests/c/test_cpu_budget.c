/* Unit tests for the CPU budget (cpu_budget.c): cgroup quotas read from a
 * fake cgroup tree in a temporary directory, laid out as cgroup v2, v1 and
 * hybrid systems and containers lay them out. */
#include "test_common.h"

#include "io_threads/cpu_budget.h"

#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char root[PATH_MAX];     /* the fake /sys/fs/cgroup */
static char proc_file[PATH_MAX]; /* the fake /proc/self/cgroup */

/* Writes `text` to root/rel, making the directories on the way. */
static void put(const char *rel, const char *text)
{
    char path[PATH_MAX];
    assert_true(snprintf(path, sizeof(path), "%s/%s", root, rel) < (int)sizeof(path));
    for (char *p = path + strlen(root) + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            assert_true(mkdir(path, 0755) == 0 || errno == EEXIST);
            *p = '/';
        }
    }
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void proc_cgroup(const char *text)
{
    FILE *f = fopen(proc_file, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static long limit(void)
{
    return mt_cgroup_cpu_limit(root, proc_file);
}

static int setup(void **state)
{
    (void)state;
    char tmpl[] = "/tmp/mt-cgroup-XXXXXX";
    char *dir = mkdtemp(tmpl);
    assert_non_null(dir);
    snprintf(root, sizeof(root), "%s/fs", dir);
    assert_int_equal(mkdir(root, 0755), 0);
    snprintf(proc_file, sizeof(proc_file), "%s/cgroup", dir);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[PATH_MAX + 16];
    char *slash = strrchr(root, '/');
    *slash = '\0'; /* the temporary directory */
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
    assert_int_equal(system(cmd), 0);
    return 0;
}

/* cgroup v2 at the root: the smallest quota of the cgroup and its
 * ancestors, rounded up; "max" is no limit. */
static void test_v2(void **state)
{
    (void)state;
    put("cgroup.controllers", "cpu memory\n");
    proc_cgroup("0::/a/b\n");
    assert_int_equal(limit(), 0); /* no cpu.max anywhere */
    put("a/b/cpu.max", "max 100000\n");
    assert_int_equal(limit(), 0);
    put("a/cpu.max", "150000 100000\n");
    assert_int_equal(limit(), 2); /* 1.5 CPUs: 2 */
    put("a/b/cpu.max", "50000 100000\n");
    assert_int_equal(limit(), 1); /* the leaf's is smaller */
    put("cpu.max", "max 100000\n");
    assert_int_equal(limit(), 1);
    /* A container's own namespace: the process sits at the root. */
    proc_cgroup("0::/\n");
    assert_int_equal(limit(), 0);
    put("cpu.max", "400000 100000\n");
    assert_int_equal(limit(), 4);
}

/* A hybrid system: v2 under unified/, only when the root is not v2. */
static void test_hybrid_unified(void **state)
{
    (void)state;
    put("unified/cgroup.controllers", "\n");
    put("unified/x/cpu.max", "300000 100000\n");
    proc_cgroup("1:cpu:/\n0::/x\n");
    assert_int_equal(limit(), 3);
}

/* cgroup v1's cpu controller, under either mount name; a path the mount
 * does not show (a container without a cgroup namespace) falls back to
 * the ancestors, down to the mount's root, which is the container's. */
static void test_v1(void **state)
{
    (void)state;
    proc_cgroup("4:cpu,cpuacct:/docker/abc\n2:cpuacct:/elsewhere\n0::/\n");
    put("cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
    put("cpu,cpuacct/cpu.cfs_period_us", "100000\n");
    assert_int_equal(limit(), 0);
    put("cpu,cpuacct/cpu.cfs_quota_us", "200000\n");
    assert_int_equal(limit(), 2);
    put("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "100000\n");
    put("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
    assert_int_equal(limit(), 1);
}

/* The cpu controller mounted on its own, at cpu/. */
static void test_v1_cpu_alone(void **state)
{
    (void)state;
    proc_cgroup("3:cpu:/svc\n2:cpuacct:/svc\n");
    put("cpu/svc/cpu.cfs_quota_us", "250000\n");
    put("cpu/svc/cpu.cfs_period_us", "100000\n");
    assert_int_equal(limit(), 3);
}

/* What cannot be read limits nothing. */
static void test_unreadable(void **state)
{
    (void)state;
    char missing[PATH_MAX + 8];
    snprintf(missing, sizeof(missing), "%s.none", proc_file);
    assert_int_equal(mt_cgroup_cpu_limit(root, missing), 0);
    proc_cgroup("garbage\n::\n7:cpuacct:/\n0::/q\n");
    put("cgroup.controllers", "cpu\n");
    put("q/cpu.max", "fifty 100000\n");
    assert_int_equal(limit(), 0);
    put("q/cpu.max", "50000 0\n");
    assert_int_equal(limit(), 0);
    put("q/cpu.max", "50000 100000\n");
    assert_int_equal(limit(), 1);
}

/* The process's own budget: its affinity mask, never more. */
static void test_usable(void **state)
{
    (void)state;
    cpu_set_t allowed;
    assert_int_equal(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
    long cpus = mt_cpus_usable();
    assert_true(cpus >= 1);
    assert_true(cpus <= CPU_COUNT(&allowed));
    long quota = mt_cgroup_cpu_limit("/sys/fs/cgroup", "/proc/self/cgroup");
    if (quota > 0 && quota < CPU_COUNT(&allowed))
        assert_int_equal(cpus, quota);
    else
        assert_int_equal(cpus, CPU_COUNT(&allowed));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_v2, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hybrid_unified, setup, teardown),
        cmocka_unit_test_setup_teardown(test_v1, setup, teardown),
        cmocka_unit_test_setup_teardown(test_v1_cpu_alone, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unreadable, setup, teardown),
        cmocka_unit_test(test_usable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
