/*
 * shifter_spank.c: the thin SPANK shim of shifter-slurm.
 *
 * It only registers the user options, runs the Python hook at the right
 * moments and moves environment variables.  All decisions (validation, image
 * resolution, building and tearing down environments) are made by the hook,
 * `SHIFTER_HOOK <name> <plugstack args...>`, so this file uses nothing but the
 * public spank.h API and does not break when Slurm's internals change.
 *
 * Hook protocol:
 *   submit  (sbatch/salloc/srun, as the user): options are passed as
 *           --image=, --volume=, --module=, --ccm, --writable.  On success the hook prints
 *           KEY=VALUE lines; each is set in the job-control environment (so
 *           the prolog sees SPANK_KEY and tasks see SLURM_SPANK_KEY) and in
 *           this process's environment (so nested sruns inherit it).  On
 *           failure it prints one line on stderr and exits non-zero, and the
 *           submission fails.
 *   prolog / epilog (slurmd, as root): the environment is the prolog's; the
 *           hook's output is copied into slurmd's log line by line.  A
 *           non-zero status fails the prolog and Slurm drains the node, so
 *           the hook returns 0 when only the user's request was at fault
 *           (it records the reason for the job's `shifter` to print).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/spank.h>

/* slurm.h's step id of the extern step (public header; repeated to keep this file's includes small) */
#ifndef SLURM_EXTERN_CONT
#define SLURM_EXTERN_CONT 0xfffffffc
#endif

SPANK_PLUGIN(shifter, 1);

#ifndef SHIFTER_HOOK
#define SHIFTER_HOOK "/usr/local/libexec/shifter/spank-hook"
#endif

#define MAX_ARGS 32
#define MAX_VALUE 8192
#define MAX_OUTPUT 65536

extern char **environ;

static char *opt_image;
static char *opt_volume;
static char *opt_module;
static int opt_ccm;

struct job_ids {
    char job_id[32], uid[32], gid[32];
};
static int opt_writable;

static int use_long_options;
static int enable_ccm;
static int extern_cgroup;
static int extern_setup;

/* Plugstack arguments every hook receives verbatim; the hook parses them. */
static const char *known_args[] = {
    "shifter_config=", "extern_setup=", "extern_cgroup=", "memory_cgroup=",
    "enable_ccm=", "enable_sshd=", "long_options", NULL,
};

static int remember(char **slot, const char *value)
{
    char *copy;

    if (value == NULL || value[0] == '\0' || strlen(value) >= MAX_VALUE) {
        slurm_error("shifter: option value is empty or too long");
        return -1;
    }
    copy = strdup(value);
    if (copy == NULL)
        return -1;
    free(*slot);
    *slot = copy;
    return 0;
}

static int image_cb(int val, const char *optarg, int remote)
{
    (void)val;
    (void)remote;
    return remember(&opt_image, optarg);
}

/* --volume may repeat; Slurm may also replay a callback, so an identical
 * entry is kept once. */
static int volume_cb(int val, const char *optarg, int remote)
{
    size_t len;
    char *joined;

    (void)val;
    (void)remote;
    if (opt_volume == NULL)
        return remember(&opt_volume, optarg);
    if (optarg == NULL || optarg[0] == '\0')
        return remember(&opt_volume, optarg);
    if (strcmp(opt_volume, optarg) == 0)
        return 0;
    len = strlen(opt_volume) + strlen(optarg) + 2;
    if (len >= MAX_VALUE) {
        slurm_error("shifter: --volume list is too long");
        return -1;
    }
    joined = malloc(len);
    if (joined == NULL)
        return -1;
    {
        size_t first = strlen(opt_volume);
        memcpy(joined, opt_volume, first);
        joined[first] = ';';
        memcpy(joined + first + 1, optarg, strlen(optarg) + 1);
    }
    free(opt_volume);
    opt_volume = joined;
    return 0;
}

static int module_cb(int val, const char *optarg, int remote)
{
    (void)val;
    (void)remote;
    return remember(&opt_module, optarg);
}

static int ccm_cb(int val, const char *optarg, int remote)
{
    (void)val;
    (void)optarg;
    (void)remote;
    opt_ccm = 1;
    return 0;
}

static int writable_cb(int val, const char *optarg, int remote)
{
    (void)val;
    (void)optarg;
    (void)remote;
    opt_writable = 1;
    return 0;
}

static struct spank_option short_options[] = {
    {"image", "type:tag", "Shifter image to use (e.g. docker:ubuntu:22.04)", 1, 0, image_cb},
    {"volume", "from:to[:flags]", "Shifter volume to bind into the image (repeatable)", 1, 0, volume_cb},
    {"module", "mod1,mod2|none", "Shifter modules to enable in the image", 1, 0, module_cb},
    {"writable", NULL, "Give the job a writable layer over its Shifter image, discarded at its end", 0, 0,
     writable_cb},
    SPANK_OPTIONS_TABLE_END,
};

static struct spank_option long_names[] = {
    {"shifter.image", "type:tag", "Shifter image to use (e.g. docker:ubuntu:22.04)", 1, 0, image_cb},
    {"shifter.volume", "from:to[:flags]", "Shifter volume to bind into the image (repeatable)", 1, 0,
     volume_cb},
    {"shifter.module", "mod1,mod2|none", "Shifter modules to enable in the image", 1, 0, module_cb},
    {"shifter.writable", NULL, "Give the job a writable layer over its Shifter image, discarded at its end",
     0, 0, writable_cb},
    SPANK_OPTIONS_TABLE_END,
};

static struct spank_option ccm_short = {
    "ccm", NULL, "Run the job in a container built from the host's / (cluster compatibility mode)", 0, 0,
    ccm_cb};
static struct spank_option ccm_long = {
    "shifter.ccm", NULL, "Run the job in a container built from the host's / (cluster compatibility mode)",
    0, 0, ccm_cb};

static void read_plugstack_args(int ac, char **av)
{
    int i, k, known;

    for (i = 0; i < ac; i++) {
        known = 0;
        for (k = 0; known_args[k] != NULL; k++) {
            size_t n = strlen(known_args[k]);
            if (strncmp(av[i], known_args[k], n) == 0 &&
                (known_args[k][n - 1] == '=' || av[i][n] == '\0')) {
                known = 1;
                break;
            }
        }
        if (!known)
            slurm_error("shifter: unknown plugstack.conf argument '%s'", av[i]);
        else if (strcmp(av[i], "long_options") == 0)
            use_long_options = 1;
        else if (strncmp(av[i], "enable_ccm=", 11) == 0)
            enable_ccm = atoi(av[i] + 11) != 0;
        else if (strncmp(av[i], "extern_cgroup=", 14) == 0)
            extern_cgroup = atoi(av[i] + 14) != 0;
        else if (strncmp(av[i], "extern_setup=", 13) == 0)
            extern_setup = av[i][13] != '\0';
    }
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    struct spank_option *opts;
    int i;

    read_plugstack_args(ac, av);
    if (ctx != S_CTX_ALLOCATOR && ctx != S_CTX_LOCAL && ctx != S_CTX_REMOTE)
        return 0;
    opts = use_long_options ? long_names : short_options;
    for (i = 0; opts[i].name != NULL; i++)
        if (spank_option_register(sp, &opts[i]) != ESPANK_SUCCESS)
            return -1;
    if (enable_ccm && spank_option_register(sp, use_long_options ? &ccm_long : &ccm_short) != ESPANK_SUCCESS)
        return -1;
    return 0;
}

/* In the child: exec the hook with stdout and stderr on the given pipes. */
static void exec_hook(char **argv, int outfd, int errfd)
{
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0)
        dup2(devnull, 0);
    dup2(outfd, 1);
    dup2(errfd, 2);
    /* nothing of slurmd/slurmstepd (sockets, files) may reach the hook or what it starts,
     * such as the job's sshd, which runs as the user */
    close_range(3, ~0U, 0);
    signal(SIGPIPE, SIG_DFL);
    execve(argv[0], argv, environ);
    dprintf(2, "cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

/* In the child of the extern slurmstepd: become a child subreaper, run the
 * hook, report its exit status on statusfd, then reap whatever the hook left
 * running (the job's sshd) and whatever that orphans, until nothing is left.
 * Everything stays a descendant of the extern step, so Slurm tracks and kills
 * it, and no orphan lingers as a zombie of slurmstepd (which never reaps
 * children it does not know).  Only async-signal-safe calls: slurmstepd has
 * threads. */
static void reap_after_hook(char **argv, int outfd, int errfd, int statusfd)
{
    int status, rc = -1;
    pid_t pid;

    signal(SIGCHLD, SIG_DFL);
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    pid = fork();
    if (pid == 0)
        exec_hook(argv, outfd, errfd);
    close(outfd);
    close(errfd);
    if (pid > 0) {
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    if (write(statusfd, &rc, sizeof(rc)) != sizeof(rc))
        rc = -1;
    close_range(3, ~0U, 0);  /* hold none of slurmstepd's descriptors for the life of the job */
    while (wait(NULL) > 0 || errno == EINTR)
        ;
    _exit(0);
}

/* Run the hook with argv; collect its stdout into out (if given) and copy
 * its stderr lines to the Slurm log (or to the user's terminal when
 * to_user).  Returns the hook's exit status, or -1 if it could not run.
 * With as_reaper the hook runs under reap_after_hook. */
static int run_hook_as(char **argv, char *out, size_t outlen, int to_user, int as_reaper)
{
    int outpipe[2], errpipe[2], statuspipe[2] = {-1, -1}, status = -1;
    size_t used = 0, errused = 0;
    char errbuf[MAX_OUTPUT];
    pid_t pid;
    struct pollfd fds[2];

    if (pipe2(outpipe, O_CLOEXEC) < 0)
        return -1;
    if (pipe2(errpipe, O_CLOEXEC) < 0) {
        close(outpipe[0]);
        close(outpipe[1]);
        return -1;
    }
    if (as_reaper && pipe2(statuspipe, O_CLOEXEC) < 0)
        statuspipe[0] = statuspipe[1] = -1;
    pid = (as_reaper && statuspipe[0] < 0) ? -1 : fork();
    if (pid < 0) {
        close(outpipe[0]);
        close(outpipe[1]);
        close(errpipe[0]);
        close(errpipe[1]);
        if (statuspipe[0] >= 0) {
            close(statuspipe[0]);
            close(statuspipe[1]);
        }
        return -1;
    }
    if (pid == 0) {
        if (as_reaper) {
            close(statuspipe[0]);
            reap_after_hook(argv, outpipe[1], errpipe[1], statuspipe[1]);
        }
        exec_hook(argv, outpipe[1], errpipe[1]);
    }
    close(outpipe[1]);
    close(errpipe[1]);
    if (as_reaper)
        close(statuspipe[1]);
    fds[0].fd = outpipe[0];
    fds[0].events = POLLIN;
    fds[1].fd = errpipe[0];
    fds[1].events = POLLIN;
    while (fds[0].fd >= 0 || fds[1].fd >= 0) {
        int k;
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (k = 0; k < 2; k++) {
            char *buf = k == 0 ? out : errbuf;
            size_t *filled = k == 0 ? &used : &errused;
            size_t cap = k == 0 ? outlen : sizeof(errbuf);
            char sink[4096];
            ssize_t n;

            if (fds[k].fd < 0 || !(fds[k].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            if (buf != NULL && *filled + 1 < cap)
                n = read(fds[k].fd, buf + *filled, cap - *filled - 1);
            else
                n = read(fds[k].fd, sink, sizeof(sink));
            if (n <= 0) {
                close(fds[k].fd);
                fds[k].fd = -1;
            } else if (buf != NULL && *filled + 1 < cap) {
                *filled += (size_t)n;
            }
        }
    }
    if (out != NULL)
        out[used] = '\0';
    errbuf[errused] = '\0';
    if (as_reaper) {
        int rc = -1;
        ssize_t got;
        while ((got = read(statuspipe[0], &rc, sizeof(rc))) < 0 && errno == EINTR)
            ;
        close(statuspipe[0]);
        status = got == sizeof(rc) && rc >= 0 ? (rc & 0xff) << 8 : -1;  /* as waitpid's */
    } else {
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
    }
    {
        char *save = NULL, *line;
        for (line = strtok_r(errbuf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            if (to_user)
                slurm_error("%s", line);
            else
                slurm_info("%s", line);
        }
    }
    if (status != -1 && WIFEXITED(status))
        return WEXITSTATUS(status);
    return -1;
}

static int run_hook(char **argv, char *out, size_t outlen, int to_user)
{
    return run_hook_as(argv, out, outlen, to_user, 0);
}

static int build_argv(char **argv, const char *hook, int ac, char **av)
{
    int n = 0, i;

    argv[n++] = SHIFTER_HOOK;
    argv[n++] = (char *)hook;
    for (i = 0; i < ac && n < MAX_ARGS - 8; i++)
        argv[n++] = av[i];
    argv[n] = NULL;
    return n;
}

static int append_job_ids(spank_t sp, char **argv, int n, struct job_ids *ids);

/* Step ids at or above this are Slurm's own steps (extern, batch, interactive, pending). */
#define FIRST_SPECIAL_STEP 0xfffffff0U

static int step_prepared;
static char step_arg[32];

/* Is the step's SHIFTER_<name> set, and not what the job's SLURM_SPANK_SHIFTER_<name> says? */
static int step_value(spank_t sp, const char *name, char *value, size_t len)
{
    return spank_getenv(sp, name, value, len) == ESPANK_SUCCESS && value[0] != '\0';
}

static int differs_from_job(spank_t sp, const char *name, const char *step_value_text)
{
    char job_name[64], job_value[MAX_VALUE];

    snprintf(job_name, sizeof(job_name), "SLURM_SPANK_%s", name);
    if (spank_getenv(sp, job_name, job_value, sizeof(job_value)) != ESPANK_SUCCESS)
        return step_value_text[0] != '\0';
    return strcmp(job_value, step_value_text) != 0;
}

/*
 * slurmstepd (root), once per node and step, before the tasks start: a step whose image,
 * volumes or modules differ from its job's (srun --image=X shifter ...) gets an environment of
 * its own, built by the hook `step-setup`; slurm_spank_exit removes it.  A step of the job's
 * own request costs nothing here (the comparison needs no hook).
 */
static int step_setup(spank_t sp, int ac, char **av)
{
    static char image[MAX_VALUE], type[64], volume[MAX_VALUE], module[MAX_VALUE];
    static char image_arg[MAX_VALUE + 16], type_arg[96], volume_arg[MAX_VALUE + 16], module_arg[MAX_VALUE + 16];
    char *argv[MAX_ARGS];
    char out[256];
    struct job_ids ids;
    uint32_t step_id = 0;
    int n, rc;

    if (spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS || step_id >= FIRST_SPECIAL_STEP)
        return 0;
    if (!step_value(sp, "SHIFTER_IMAGE", image, sizeof(image)))
        return 0;
    if (!step_value(sp, "SHIFTER_IMAGETYPE", type, sizeof(type)))
        snprintf(type, sizeof(type), "id");
    if (!step_value(sp, "SHIFTER_VOLUME", volume, sizeof(volume)))
        volume[0] = '\0';
    if (!step_value(sp, "SHIFTER_MODULE", module, sizeof(module)))
        module[0] = '\0';
    if (!differs_from_job(sp, "SHIFTER_IMAGE", image) && !differs_from_job(sp, "SHIFTER_VOLUME", volume) &&
        !differs_from_job(sp, "SHIFTER_MODULE", module))
        return 0;
    n = build_argv(argv, "step-setup", ac, av);
    if (append_job_ids(sp, argv, n, &ids) < 0) {
        slurm_error("shifter: step image: no job id, uid or gid");
        return -1;
    }
    n += 3;
    snprintf(step_arg, sizeof(step_arg), "--step-id=%u", step_id);
    snprintf(image_arg, sizeof(image_arg), "--image=%s", image);
    snprintf(type_arg, sizeof(type_arg), "--image-type=%s", type);
    argv[n++] = step_arg;
    argv[n++] = image_arg;
    argv[n++] = type_arg;
    if (volume[0]) {
        snprintf(volume_arg, sizeof(volume_arg), "--volume=%s", volume);
        argv[n++] = volume_arg;
    }
    if (module[0]) {
        snprintf(module_arg, sizeof(module_arg), "--module=%s", module);
        argv[n++] = module_arg;
    }
    argv[n] = NULL;
    out[0] = '\0';
    rc = run_hook(argv, out, sizeof(out), 0);
    if (strncmp(out, "prepared", 8) == 0)
        step_prepared = 1;
    if (rc != 0) {
        slurm_error("shifter: step-setup hook failed (status %d)", rc);
        return -1;
    }
    return 0;
}

static void step_teardown(spank_t sp, int ac, char **av)
{
    char *argv[MAX_ARGS];
    struct job_ids ids;
    int n, rc, tries;

    n = build_argv(argv, "step-teardown", ac, av);
    if (append_job_ids(sp, argv, n, &ids) < 0) {
        slurm_error("shifter: step image: no job id, uid or gid at the end of the step");
        return;
    }
    argv[n + 3] = step_arg;
    argv[n + 4] = NULL;
    /* A cancelled step's processes are killed until none is left (proctrack), and the hook is
     * one of them while that lasts: run it again, a little later, while a signal ends it. */
    for (tries = 0; (rc = run_hook(argv, NULL, 0, 0)) < 0 && tries < 50; tries++)
        usleep(100000);
    if (rc != 0)
        slurm_error("shifter: step-teardown hook failed (status %d)", rc);
}

/* Submission: resolve the image once and publish the result.  In slurmstepd: a step's image. */
int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    char *argv[MAX_ARGS];
    char image_arg[MAX_VALUE + 16], volume_arg[MAX_VALUE + 16], module_arg[MAX_VALUE + 16];
    char out[MAX_OUTPUT];
    char *save = NULL, *line;
    int n, rc, new_job;

    if (ctx == S_CTX_REMOTE)
        return step_setup(sp, ac, av);
    if (ctx != S_CTX_ALLOCATOR && ctx != S_CTX_LOCAL)
        return 0;
    if (opt_image == NULL && opt_volume == NULL && opt_module == NULL && !opt_ccm && !opt_writable)
        return 0;
    n = build_argv(argv, "submit", ac, av);
    if (opt_image) {
        snprintf(image_arg, sizeof(image_arg), "--image=%s", opt_image);
        argv[n++] = image_arg;
    }
    if (opt_volume) {
        snprintf(volume_arg, sizeof(volume_arg), "--volume=%s", opt_volume);
        argv[n++] = volume_arg;
    }
    if (opt_module) {
        snprintf(module_arg, sizeof(module_arg), "--module=%s", opt_module);
        argv[n++] = module_arg;
    }
    if (opt_ccm)
        argv[n++] = "--ccm";
    if (opt_writable)
        argv[n++] = "--writable";
    argv[n] = NULL;

    rc = run_hook(argv, out, sizeof(out), 1);
    if (rc != 0) {
        if (rc < 0)
            slurm_error("shifter: cannot run %s", SHIFTER_HOOK);
        /* The hook already said what is wrong in one line; returning an error
         * would make Slurm add two generic lines after it.  Nothing has been
         * submitted yet, so leaving here (as the original plugin did) is safe. */
        exit(1);
    }
    /* A new job (sbatch, salloc, or srun outside an allocation): its steps carry the job's
     * request as SLURM_SPANK_SHIFTER_* too, as a batch script's do, so slurmstepd tells a step of
     * another image (srun --image=X sets SHIFTER_* only) from the job's own without a hook. */
    new_job = ctx == S_CTX_ALLOCATOR || getenv("SLURM_JOB_ID") == NULL;
    for (line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *eq = strchr(line, '=');
        if (eq == NULL || eq == line)
            continue;
        *eq = '\0';
        if (strncmp(line, "SHIFTER_", 8) == 0) {
            spank_job_control_setenv(sp, line, eq + 1, 1);
            if (new_job) {
                char job_name[128];
                snprintf(job_name, sizeof(job_name), "SLURM_SPANK_%s", line);
                setenv(job_name, eq + 1, 1);
            }
        }
        setenv(line, eq + 1, 1);
    }
    return 0;
}

static int job_script_hook(spank_t sp, const char *hook, int ac, char **av)
{
    char *argv[MAX_ARGS];
    char jobid[32], uid[32], gid[32];
    uint32_t job_id = 0;
    uid_t job_uid = 0;
    gid_t job_gid = 0;
    int n, rc;

    if (getenv("SPANK_SHIFTER_IMAGE") == NULL && getenv("SPANK_SHIFTER_CCM") == NULL)
        return 0;
    n = build_argv(argv, hook, ac, av);
    if (spank_get_item(sp, S_JOB_ID, &job_id) == ESPANK_SUCCESS) {
        snprintf(jobid, sizeof(jobid), "--job-id=%u", job_id);
        argv[n++] = jobid;
    }
    if (spank_get_item(sp, S_JOB_UID, &job_uid) == ESPANK_SUCCESS) {
        snprintf(uid, sizeof(uid), "--uid=%u", (unsigned)job_uid);
        argv[n++] = uid;
    }
    if (spank_get_item(sp, S_JOB_GID, &job_gid) == ESPANK_SUCCESS) {
        snprintf(gid, sizeof(gid), "--gid=%u", (unsigned)job_gid);
        argv[n++] = gid;
    }
    argv[n] = NULL;
    rc = run_hook(argv, NULL, 0, 0);
    if (rc != 0) {
        slurm_error("shifter: %s hook failed (status %d)", hook, rc);
        return -1;
    }
    return 0;
}

int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
    return job_script_hook(sp, "prolog", ac, av);
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
    return job_script_hook(sp, "epilog", ac, av);
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
    if (step_prepared && spank_context() == S_CTX_REMOTE) {
        step_teardown(sp, ac, av);
        step_prepared = 0;
    }
    free(opt_image);
    free(opt_volume);
    free(opt_module);
    opt_image = opt_volume = opt_module = NULL;
    return 0;
}

/* --job-id, --uid and --gid of the job, from Slurm (never from the user's environment). */
static int append_job_ids(spank_t sp, char **argv, int n, struct job_ids *ids)
{
    uint32_t job_id = 0;
    uid_t job_uid = 0;
    gid_t job_gid = 0;

    if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_UID, &job_uid) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_GID, &job_gid) != ESPANK_SUCCESS)
        return -1;
    snprintf(ids->job_id, sizeof(ids->job_id), "--job-id=%u", job_id);
    snprintf(ids->uid, sizeof(ids->uid), "--uid=%u", (unsigned)job_uid);
    snprintf(ids->gid, sizeof(ids->gid), "--gid=%u", (unsigned)job_gid);
    argv[n++] = ids->job_id;
    argv[n++] = ids->uid;
    argv[n++] = ids->gid;
    argv[n] = NULL;
    return n;
}

/*
 * The extern step (PrologFlags=contain): its slurmstepd lives as long as the job.
 * With extern_cgroup=1 the hook starts the job's sshd under a child subreaper
 * forked from this slurmstepd (reap_after_hook), so the daemon (and whatever it
 * starts and orphans) stays a descendant of the extern step rather than of init:
 * Slurm's process tracking finds it, accounts for it and kills it at the end of
 * the job.  The hook also runs extern_setup.  Every other step returns at once.
 */
int slurm_spank_task_post_fork(spank_t sp, int ac, char **av)
{
    char *argv[MAX_ARGS];
    struct job_ids ids;
    uint32_t step_id = 0;
    int n, rc;

    if ((!extern_cgroup && !extern_setup) || spank_context() != S_CTX_REMOTE)
        return 0;
    if (spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS || step_id != SLURM_EXTERN_CONT)
        return 0;
    n = build_argv(argv, "extern", ac, av);
    if (append_job_ids(sp, argv, n, &ids) < 0) {
        slurm_error("shifter: extern step: no job id, uid or gid");
        return -1;
    }
    rc = run_hook_as(argv, NULL, 0, 0, extern_cgroup);
    if (rc != 0) {
        slurm_error("shifter: extern hook failed (status %d)", rc);
        return -1;
    }
    return 0;
}

/*
 * --ccm: each task of the job (not of its extern step) is chrooted into the
 * job's container, whose path the hook prints.  The chroot must happen in the
 * task's own process, so it is done here; Slurm drops privileges after this.
 */
int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
    char *argv[MAX_ARGS];
    char value[8], root[4096], cwd[4096];
    struct job_ids ids;
    int n, rc, have_cwd;
    size_t len;

    if (!enable_ccm || spank_context() != S_CTX_REMOTE)
        return 0;
    if (spank_getenv(sp, "SLURM_SPANK_SHIFTER_CCM", value, sizeof(value)) != ESPANK_SUCCESS ||
        strcmp(value, "1") != 0)
        return 0;
    n = build_argv(argv, "ccm-task", ac, av);
    if (append_job_ids(sp, argv, n, &ids) < 0) {
        slurm_error("shifter: --ccm: no job id, uid or gid");
        return -1;
    }
    rc = run_hook(argv, root, sizeof(root), 1);
    len = strlen(root);
    while (len > 0 && root[len - 1] == '\n')
        root[--len] = '\0';
    if (rc != 0 || root[0] != '/' || strchr(root, '\n') != NULL) {
        slurm_error("shifter: --ccm: this task has no container to run in");
        return -1;
    }
    have_cwd = getcwd(cwd, sizeof(cwd)) != NULL;
    if (chdir(root) != 0 || chroot(".") != 0) {
        slurm_error("shifter: --ccm: cannot enter %s: %s", root, strerror(errno));
        return -1;
    }
    /* the container is the host's /, so the task's directory has the same path in it */
    if ((!have_cwd || chdir(cwd) != 0) && chdir("/") != 0) {
        slurm_error("shifter: --ccm: cannot change to /: %s", strerror(errno));
        return -1;
    }
    return 0;
}
