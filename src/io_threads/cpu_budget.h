/* How many CPUs this process can actually use: the ones its affinity mask
 * allows, and no more than its cgroup's CPU quota pays for.
 *
 * A container limited to one CPU's worth of time (docker --cpus=1, a
 * Kubernetes limit of 1000m) still sees every CPU of the host in its
 * affinity mask; sized by the mask alone, a loop there would start up to
 * eight I/O threads that can only take turns.  The quota is read from
 * cgroup v2's cpu.max or cgroup v1's cpu.cfs_quota_us / cpu.cfs_period_us,
 * for the process's own cgroup and each of its ancestors (the smallest
 * wins), with the hierarchies mounted where systemd and container runtimes
 * mount them. */
#ifndef MT_CPU_BUDGET_H
#define MT_CPU_BUDGET_H

/* The CPU quota, rounded up to whole CPUs, of the cgroups that
 * `proc_cgroup` (a /proc/<pid>/cgroup file) names, under the cgroup file
 * systems mounted at `cgroup_root` (normally /sys/fs/cgroup: v2 there or
 * at unified/, v1's cpu controller at cpu,cpuacct/ or cpu/).  0 when no
 * quota limits it or nothing could be read. */
long mt_cgroup_cpu_limit(const char *cgroup_root, const char *proc_cgroup);

/* The CPUs in this process's affinity mask, capped by its cgroup quota;
 * at least 1. */
long mt_cpus_usable(void);

#endif
