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
 *           --image=, --volume=, --module=, --ccm.  On success the hook prints
 *           KEY=VALUE lines; each is set in the job-control environment (so
 *           the prolog sees SPANK_KEY and tasks see SLURM_SPANK_KEY) and in
 *           this process's environment (so nested sruns inherit it).  On
 *           failure it prints one line on stderr and exits non-zero, and the
 *           submission fails.
 *   prolog / epilog (slurmd, as root): the environment is the prolog's; the
 *           hook's output is copied into slurmd's log line by line.
 *   task    (slurmstepd, per task, before privileges are dropped): lets the
 *           hook refuse the task with the prolog's setup error.
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
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/spank.h>

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

static int use_long_options;
static int enable_ccm;

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

static struct spank_option short_options[] = {
    {"image", "type:tag", "Shifter image to use (e.g. docker:ubuntu:22.04)", 1, 0, image_cb},
    {"volume", "from:to[:flags]", "Shifter volume to bind into the image (repeatable)", 1, 0, volume_cb},
    {"module", "mod1,mod2|none", "Shifter modules to enable in the image", 1, 0, module_cb},
    SPANK_OPTIONS_TABLE_END,
};

static struct spank_option long_names[] = {
    {"shifter.image", "type:tag", "Shifter image to use (e.g. docker:ubuntu:22.04)", 1, 0, image_cb},
    {"shifter.volume", "from:to[:flags]", "Shifter volume to bind into the image (repeatable)", 1, 0,
     volume_cb},
    {"shifter.module", "mod1,mod2|none", "Shifter modules to enable in the image", 1, 0, module_cb},
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

/* Run the hook with argv; collect its stdout into out (if given) and copy
 * its stderr lines to the Slurm log (or to the user's terminal when
 * to_user).  Returns the hook's exit status, or -1 if it could not run. */
static int run_hook(char **argv, char *out, size_t outlen, int to_user)
{
    int outpipe[2], errpipe[2], status;
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
    pid = fork();
    if (pid < 0) {
        close(outpipe[0]);
        close(outpipe[1]);
        close(errpipe[0]);
        close(errpipe[1]);
        return -1;
    }
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0)
            dup2(devnull, 0);
        dup2(outpipe[1], 1);
        dup2(errpipe[1], 2);
        signal(SIGPIPE, SIG_DFL);
        execve(argv[0], argv, environ);
        dprintf(2, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(outpipe[1]);
    close(errpipe[1]);
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
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    {
        char *save = NULL, *line;
        for (line = strtok_r(errbuf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            if (to_user)
                slurm_error("%s", line);
            else
                slurm_info("%s", line);
        }
    }
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return -1;
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

/* Submission: resolve the image once and publish the result. */
int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    char *argv[MAX_ARGS];
    char image_arg[MAX_VALUE + 16], volume_arg[MAX_VALUE + 16], module_arg[MAX_VALUE + 16];
    char out[MAX_OUTPUT];
    char *save = NULL, *line;
    int n, rc;

    if (ctx != S_CTX_ALLOCATOR && ctx != S_CTX_LOCAL)
        return 0;
    if (opt_image == NULL && opt_volume == NULL && opt_module == NULL && !opt_ccm)
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
    for (line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *eq = strchr(line, '=');
        if (eq == NULL || eq == line)
            continue;
        *eq = '\0';
        if (strncmp(line, "SHIFTER_", 8) == 0)
            spank_job_control_setenv(sp, line, eq + 1, 1);
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
    (void)sp;
    (void)ac;
    (void)av;
    free(opt_image);
    free(opt_volume);
    free(opt_module);
    opt_image = opt_volume = opt_module = NULL;
    return 0;
}
