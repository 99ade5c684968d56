/* The CPUs a process can use: affinity mask and cgroup quota.  See
 * cpu_budget.h. */
#include "io_threads/cpu_budget.h"

#include <limits.h>
#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Reads up to two integers from `path`; "max" reads as -1.  Returns how
 * many were read. */
static int read_numbers(const char *path, long long *a, long long *b)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return 0;
    char word[2][32];
    int n = fscanf(f, "%31s %31s", word[0], word[1]);
    fclose(f);
    long long *out[2] = {a, b};
    for (int i = 0; i < n; i++) {
        if (strcmp(word[i], "max") == 0) {
            *out[i] = -1;
            continue;
        }
        char *end;
        *out[i] = strtoll(word[i], &end, 10);
        if (*end != '\0')
            return i;
    }
    return n < 0 ? 0 : n;
}

static long whole_cpus(long long quota, long long period)
{
    if (quota <= 0 || period <= 0)
        return 0;
    return (long)((quota + period - 1) / period);
}

/* The quota of the cgroup at dir (a v2 directory when v2, else a v1 cpu
 * one), or 0. */
static long dir_limit(const char *dir, bool v2)
{
    char path[PATH_MAX];
    long long quota = -1, period = 0;
    if (v2) {
        if (snprintf(path, sizeof(path), "%s/cpu.max", dir) >= (int)sizeof(path) ||
            read_numbers(path, &quota, &period) < 2)
            return 0;
        return whole_cpus(quota, period);
    }
    long long unused;
    if (snprintf(path, sizeof(path), "%s/cpu.cfs_quota_us", dir) >= (int)sizeof(path) ||
        read_numbers(path, &quota, &unused) < 1 ||
        snprintf(path, sizeof(path), "%s/cpu.cfs_period_us", dir) >= (int)sizeof(path) ||
        read_numbers(path, &period, &unused) < 1)
        return 0;
    return whole_cpus(quota, period);
}

/* The smallest quota of `cgroup` (a path like /a/b) and its ancestors under
 * the hierarchy mounted at `mount`, or 0. */
static long hierarchy_limit(const char *mount, const char *cgroup, bool v2)
{
    char rel[PATH_MAX], dir[PATH_MAX];
    if (snprintf(rel, sizeof(rel), "%s", cgroup) >= (int)sizeof(rel))
        return 0;
    long best = 0;
    for (;;) {
        size_t len = strlen(rel);
        while (len > 0 && rel[len - 1] == '/')
            rel[--len] = '\0';
        if (snprintf(dir, sizeof(dir), "%s%s", mount, rel) < (int)sizeof(dir)) {
            long limit = dir_limit(dir, v2);
            if (limit > 0 && (best == 0 || limit < best))
                best = limit;
        }
        if (len == 0)
            return best;
        char *slash = strrchr(rel, '/');
        if (slash == NULL)
            rel[0] = '\0';
        else
            *slash = '\0';
    }
}

static bool is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static bool has_cpu_controller(const char *list)
{
    char copy[256];
    if (snprintf(copy, sizeof(copy), "%s", list) >= (int)sizeof(copy))
        return false;
    char *save = NULL;
    for (char *c = strtok_r(copy, ",", &save); c != NULL; c = strtok_r(NULL, ",", &save)) {
        if (strcmp(c, "cpu") == 0)
            return true;
    }
    return false;
}

long mt_cgroup_cpu_limit(const char *cgroup_root, const char *proc_cgroup)
{
    FILE *f = fopen(proc_cgroup, "re");
    if (f == NULL)
        return 0;
    char line[PATH_MAX + 300], mount[PATH_MAX];
    long best = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        /* hierarchy-ID:controllers:path (the path may hold colons) */
        char *c1 = strchr(line, ':');
        char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (c2 == NULL)
            continue;
        *c1 = *c2 = '\0';
        const char *controllers = c1 + 1, *path = c2 + 1;
        long limit = 0;
        if (strcmp(line, "0") == 0 && *controllers == '\0') {
            /* v2: at the root, or beside the v1 hierarchies on a hybrid
             * system. */
            const char *where[] = {"", "/unified"};
            for (int i = 0; i < 2 && limit == 0; i++) {
                char probe[PATH_MAX];
                if (snprintf(mount, sizeof(mount), "%s%s", cgroup_root, where[i]) >=
                        (int)sizeof(mount) ||
                    snprintf(probe, sizeof(probe), "%s/cgroup.controllers", mount) >=
                        (int)sizeof(probe) ||
                    access(probe, R_OK) != 0)
                    continue;
                limit = hierarchy_limit(mount, path, true);
            }
        } else if (has_cpu_controller(controllers)) {
            const char *where[] = {"/cpu,cpuacct", "/cpuacct,cpu", "/cpu"};
            for (int i = 0; i < 3 && limit == 0; i++) {
                if (snprintf(mount, sizeof(mount), "%s%s", cgroup_root, where[i]) >=
                        (int)sizeof(mount) ||
                    !is_dir(mount))
                    continue;
                limit = hierarchy_limit(mount, path, false);
            }
        }
        if (limit > 0 && (best == 0 || limit < best))
            best = limit;
    }
    fclose(f);
    return best;
}

long mt_cpus_usable(void)
{
    cpu_set_t allowed;
    long cpus = sched_getaffinity(0, sizeof(allowed), &allowed) == 0
                    ? CPU_COUNT(&allowed)
                    : sysconf(_SC_NPROCESSORS_ONLN);
    long quota = mt_cgroup_cpu_limit("/sys/fs/cgroup", "/proc/self/cgroup");
    if (quota > 0 && quota < cpus)
        cpus = quota;
    return cpus < 1 ? 1 : cpus;
}
