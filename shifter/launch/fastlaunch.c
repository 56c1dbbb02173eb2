/*
 * shifter: enter the job's prepared environment without starting an interpreter.
 *
 * Installed as $PREFIX/bin/shifter in front of the Python launcher (shifter/launch/launcher.py).
 * Every task of a job runs `shifter <cmd>`; starting Python alone costs more than the
 * whole entry, so this program handles the one case that runs on every task - no options,
 * the job's own image, volumes and modules, an environment setupRoot prepared on this node
 * (or the step's own, which slurmstepd prepared for `srun --image=...`) - and execs the Python
 * launcher, unchanged, for everything else.
 *
 * It decides nothing itself: setupRoot writes a launch plan (shifter/formats/launchplan.py) with the
 * request it prepared, the identity of the udiRoot.conf it read and the image's and site's
 * environment changes, all computed by the Python code.  This program only checks that the
 * plan describes this request and replays it.  Whatever it does not recognise (an option, a
 * script that names shifter as its interpreter, another image, a changed udiRoot.conf, no plan)
 * goes to the Python launcher before anything has changed, so both paths behave the same;
 * tests/integration/test_fast_launcher.py compares them.
 *
 * It runs as the user and needs no privilege: joining the job's user namespace is allowed
 * only to the namespace's owner, the job's user, and gives nothing on the host.
 * Memory is never freed: every path ends, within microseconds, in an exec or an exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef SHIFTER_CONFIG_FILE
#error "build with -DSHIFTER_CONFIG_FILE=\"<sysconfdir>/udiRoot.conf\""
#endif
#ifndef SHIFTER_PYTHON_LAUNCHER
#error "build with -DSHIFTER_PYTHON_LAUNCHER=\"<prefix>/libexec/shifter/shifter\""
#endif

#define PLAN_VERSION "shifter-launch-plan/1"
#define MAX_CONFIG_BYTES (1 << 20)
#define MAX_PLAN_BYTES (4 << 20)
#define MAX_JOBID_DIGITS 20
#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"

extern char **environ;

/* Not this program's case: let the Python launcher handle it, with nothing changed yet. */
static _Noreturn void python_launcher(char **argv)
{
    argv[0] = (char *)SHIFTER_PYTHON_LAUNCHER;
    execv(SHIFTER_PYTHON_LAUNCHER, argv);
    fprintf(stderr, "shifter: cannot run %s: %s\n", SHIFTER_PYTHON_LAUNCHER, strerror(errno));
    _exit(127);
}

static _Noreturn void fail(const char *what, const char *detail)
{
    fprintf(stderr, "shifter: %s: %s\n", what, detail);
    _exit(1);
}

/* SHIFTER_<name>, else SLURM_SPANK_SHIFTER_<name>; empty counts as unset ("" returned). */
static const char *request_value(const char *name)
{
    char key[64];
    const char *value;

    snprintf(key, sizeof key, "SHIFTER_%s", name);
    value = getenv(key);
    if (value && *value)
        return value;
    snprintf(key, sizeof key, "SLURM_SPANK_SHIFTER_%s", name);
    value = getenv(key);
    return value ? value : "";
}

/* The whole of a small file, NUL-terminated; NULL when it cannot be read or is too large. */
static char *read_file(int fd, size_t limit, size_t *length)
{
    size_t size = 0, capacity = 8192;
    char *data = malloc(capacity + 1);

    while (data) {
        ssize_t got = read(fd, data + size, capacity - size);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            free(data);
            return NULL;
        }
        if (got == 0)
            break;
        size += (size_t)got;
        if (size == capacity) {
            char *bigger = capacity >= limit ? NULL : realloc(data, capacity * 2 + 1);
            if (!bigger) {
                free(data);
                return NULL;
            }
            data = bigger;
            capacity *= 2;
        }
    }
    if (data) {
        data[size] = '\0';
        *length = size;
    }
    return data;
}

static char *trim(char *start, char *end)
{
    while (start < end && (*start == ' ' || *start == '\t' || *start == '\r'))
        start++;
    while (end > start && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
        end--;
    *end = '\0';
    return start;
}

/*
 * udiMount from udiRoot.conf (last one wins), or NULL.  Only plain `key=value` files are read
 * here; a file with continuation lines goes to the Python launcher, which parses everything.
 */
static char *udi_mount(const char *path, struct stat *info)
{
    size_t length;
    char *text, *line, *found = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return NULL;
    text = fstat(fd, info) == 0 ? read_file(fd, MAX_CONFIG_BYTES, &length) : NULL;
    close(fd);
    if (!text || strstr(text, "\\\n") || memchr(text, '\0', length))
        return NULL;
    for (line = text; *line; ) {
        char *end = strchr(line, '\n'), *next, *equals;
        if (!end)
            end = line + strlen(line);
        next = *end ? end + 1 : end;
        equals = memchr(line, '=', (size_t)(end - line));
        if (line[0] != '#' && equals) {
            char *value_end = end;
            *equals = '\0';
            if (strcmp(trim(line, equals), "udiMount") == 0)
                found = trim(equals + 1, value_end);
        }
        line = next;
    }
    if (!found || !*found)
        return NULL;
    return found;  /* points into text */
}

static int valid_jobid(const char *jobid)
{
    size_t n = strlen(jobid);

    if (n == 0 || n > MAX_JOBID_DIGITS)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (jobid[i] < '0' || jobid[i] > '9')
            return 0;
    return 1;
}

/* A script that names shifter as its interpreter: the Python launcher keeps it readable. */
static int may_be_script(const char *path)
{
    char head[2];
    struct stat info;
    int fd = open(path, O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    int script;

    if (fd < 0)
        return 0;
    script = fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && pread(fd, head, 2, 0) == 2 &&
             head[0] == '#' && head[1] == '!';
    close(fd);
    return script;
}

/* The task's environment as an array we can change: first entry of a name wins, as in Python. */
struct environment {
    char **entries;
    size_t count, capacity;
};

static char **find(struct environment *env, const char *name, size_t name_length)
{
    for (size_t i = 0; i < env->count; i++)
        if (strncmp(env->entries[i], name, name_length) == 0 && env->entries[i][name_length] == '=')
            return &env->entries[i];
    return NULL;
}

static void set_entry(struct environment *env, const char *name, size_t name_length, const char *value)
{
    char *entry, **slot = find(env, name, name_length);

    if (asprintf(&entry, "%.*s=%s", (int)name_length, name, value) < 0)
        fail("environment", "out of memory");
    if (slot) {
        *slot = entry;
        return;
    }
    if (env->count + 1 >= env->capacity) {
        env->capacity = env->capacity * 2 + 16;
        env->entries = realloc(env->entries, env->capacity * sizeof *env->entries);
        if (!env->entries)
            fail("environment", "out of memory");
    }
    env->entries[env->count++] = entry;
    env->entries[env->count] = NULL;
}

static void copy_environment(struct environment *env)
{
    for (char **e = environ; *e; e++) {
        const char *equals = strchr(*e, '=');
        if (equals && equals != *e && !find(env, *e, (size_t)(equals - *e)))
            set_entry(env, *e, (size_t)(equals - *e), equals + 1);
    }
}

/* "%NAME=IDS": each decimal index in the task's value becomes its place in IDS (the GPUs the
 * container shows); one not in IDS is dropped; other items (GPU-<uuid>, MIG-...) are kept.
 * The same as renumber_devices() in shifter/formats/environment.py. */
static char *renumber(const char *value, const char *ids)
{
    size_t size = strlen(value) + 1;
    char *out = malloc(size), *copy = strdup(value), *save = NULL;

    if (!out || !copy)
        fail("environment", "out of memory");
    out[0] = '\0';
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char place[24];
        const char *text = item;
        size_t length = strspn(item, "0123456789");

        if (length > 0 && item[length] == '\0') {
            unsigned long index = strtoul(item, NULL, 10), position = 0;
            const char *id = ids;
            text = NULL;
            while (*id) {
                if (strtoul(id, NULL, 10) == index) {
                    snprintf(place, sizeof place, "%lu", position);
                    text = place;
                    break;
                }
                id += strcspn(id, ",");
                id += *id == ',';
                position++;
            }
            if (!text)
                continue;
        }
        if (strlen(out) + strlen(text) + 2 > size) {
            size = strlen(out) + strlen(text) + 2;
            out = realloc(out, size);
            if (!out)
                fail("environment", "out of memory");
        }
        if (out[0])
            strcat(out, ",");
        strcat(out, text);
    }
    free(copy);
    return out;
}

/* One record of the plan's environment changes: =NAME=VALUE +NAME=VALUE ^NAME=VALUE -NAME %NAME=IDS */
static void apply_operation(struct environment *env, const char *record)
{
    char kind = record[0];
    const char *name = record + 1, *equals = strchr(name, '=');

    if (kind == '-') {
        char **slot = find(env, name, strlen(name));
        if (slot) {  /* keep the order of the rest, as Python's dict does */
            size_t after = (size_t)(&env->entries[env->count] - slot) - 1;
            memmove(slot, slot + 1, after * sizeof *slot);
            env->entries[--env->count] = NULL;
        }
        return;
    }
    size_t name_length = (size_t)(equals - name);
    char **slot = find(env, name, name_length);
    const char *old = slot ? *slot + name_length + 1 : "";
    char *joined = NULL;

    if (kind == '+' && *old && asprintf(&joined, "%s:%s", old, equals + 1) < 0)
        fail("environment", "out of memory");
    if (kind == '^' && *old && asprintf(&joined, "%s:%s", equals + 1, old) < 0)
        fail("environment", "out of memory");
    if (kind == '%') {
        if (!slot)
            return;
        joined = renumber(old, equals + 1);
    }
    set_entry(env, name, name_length, joined ? joined : equals + 1);
}

struct plan {
    const char *workdir;
    char *operations;   /* the first environment record; the rest follow up to end */
    char *end;
};

static int expect(char **record, char *end, char tag, const char *value)
{
    if (*record >= end || (*record)[0] != tag || strcmp(*record + 1, value) != 0)
        return 0;
    *record += strlen(*record) + 1;
    return 1;
}

/* Read the plan and check it describes this request; 0 when it does not (or is not a plan). */
static int load_plan(const char *path, const struct stat *config, const char *image, struct plan *plan)
{
    char identity[128], uid[32], *data, *record, *end;
    struct stat info;
    size_t length;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);

    if (fd < 0)
        return 0;
    data = fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && info.st_uid == 0
               ? read_file(fd, MAX_PLAN_BYTES, &length) : NULL;
    close(fd);
    if (!data || length == 0 || data[length - 1] != '\0')
        return 0;
    snprintf(identity, sizeof identity, "%llu:%llu:%lld:%lld", (unsigned long long)config->st_dev,
             (unsigned long long)config->st_ino, (long long)config->st_size,
             (long long)config->st_mtim.tv_sec * 1000000000LL + config->st_mtim.tv_nsec);
    snprintf(uid, sizeof uid, "%u", (unsigned)getuid());
    record = data;
    end = data + length;
    if (strcmp(record, PLAN_VERSION) != 0)
        return 0;
    record += strlen(record) + 1;
    if (!expect(&record, end, 'c', identity) || !expect(&record, end, 'u', uid) ||
        !expect(&record, end, 'i', image) || !expect(&record, end, 'v', request_value("VOLUME")) ||
        !expect(&record, end, 'm', request_value("MODULE")) || record >= end || record[0] != 'w')
        return 0;
    plan->workdir = record + 1;
    record += strlen(record) + 1;
    for (char *op = record; op < end; op += strlen(op) + 1) {
        const char *equals = op[0] ? strchr(op + 1, '=') : NULL;
        int valid = op[0] == '-' ? op[1] != '\0' : strchr("=+^%", op[0]) && equals && equals > op + 1;
        if (!valid)
            return 0;
    }
    plan->operations = record;
    plan->end = end;
    return 1;
}

/* Before the exec: no way back to any capability, for this program and what it starts. */
static void drop_privileges(long last_cap)
{
    for (long cap = 0; cap <= last_cap; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0)
            fail("cannot drop capabilities", strerror(errno));
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        fail("cannot set no_new_privs", strerror(errno));
}

static long last_capability(void)
{
    char text[16] = {0};
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    long last = fd >= 0 && read(fd, text, sizeof text - 1) > 0 ? strtol(text, NULL, 10) : -1;

    if (fd >= 0)
        close(fd);
    return last > 0 && last < 100 ? last : -1;
}

/* execvpe over the container's PATH, with the Python launcher's messages and exit codes. */
static _Noreturn void run(char **argv, struct environment *env)
{
    const char *name = argv[0], *path = NULL;
    int denied = 0, other = 0;

    if (strchr(name, '/')) {
        execve(name, argv, env->entries);
        if (errno == EACCES)
            denied = 1;
        else if (errno != ENOENT && errno != ENOTDIR)
            other = errno;
    } else {
        char **slot = find(env, "PATH", 4);
        path = slot ? *slot + 5 : DEFAULT_PATH;
        for (const char *dir = path;; ) {
            const char *colon = strchr(dir, ':');
            size_t n = colon ? (size_t)(colon - dir) : strlen(dir);
            char *candidate;
            if (asprintf(&candidate, "%.*s/%s", (int)(n ? n : 1), n ? dir : ".", name) < 0)
                fail(name, "out of memory");
            execve(candidate, argv, env->entries);
            if (errno == EACCES)
                denied = 1;
            else if (errno != ENOENT && errno != ENOTDIR && !other)
                other = errno;
            free(candidate);
            if (!colon)
                break;
            dir = colon + 1;
        }
    }
    if (denied || other) {
        fprintf(stderr, "shifter: %s: %s\n", name, denied ? "permission denied" : strerror(other));
        _exit(126);
    }
    fprintf(stderr, "shifter: %s: not found in image\n", name);
    _exit(127);
}

int main(int argc, char **argv)
{
    const char *config_path = getenv("SHIFTER_UDIROOT_CONF");
    const char *jobid = getenv("SLURM_JOB_ID");
    const char *image = request_value("IMAGE");
    const char *image_request = request_value("IMAGEREQUEST");
    struct environment env = {0};
    struct stat config;
    struct plan plan;
    char *mount, *dir, *plan_path, *cwd;
    long last_cap;
    int userns;

    if (argc < 2 || argv[1][0] == '-' || (argc == 2 && strcmp(argv[1], "doctor") == 0))
        python_launcher(argv);
    if (!config_path || !*config_path)
        config_path = SHIFTER_CONFIG_FILE;
    if (!jobid || !valid_jobid(jobid) || strcmp(request_value("IMAGETYPE"), "id") != 0 || !*image)
        python_launcher(argv);
    mount = udi_mount(config_path, &config);
    if (!mount)
        python_launcher(argv);
    for (size_t n = strlen(mount); n > 1 && mount[n - 1] == '/'; n--)
        mount[n - 1] = '\0';
    {
        /* a step's own environment first (srun --image=... built by slurmstepd), if it serves this request */
        const char *step = getenv("SLURM_STEP_ID");
        int found = 0;
        if (step && valid_jobid(step) &&
            asprintf(&dir, "%s/%s.%s", strcmp(mount, "/") == 0 ? "" : mount, jobid, step) >= 0 &&
            asprintf(&plan_path, "%s/launch.plan", dir) >= 0)
            found = load_plan(plan_path, &config, image, &plan);
        if (!found) {
            if (asprintf(&dir, "%s/%s", strcmp(mount, "/") == 0 ? "" : mount, jobid) < 0 ||
                asprintf(&plan_path, "%s/launch.plan", dir) < 0)
                python_launcher(argv);
            if (!load_plan(plan_path, &config, image, &plan))
                python_launcher(argv);
        }
    }
    if (argc >= 3 && argv[2][0] != '-' && may_be_script(argv[2]))
        python_launcher(argv);
    last_cap = last_capability();
    if (last_cap < 0)
        python_launcher(argv);

    copy_environment(&env);
    if (*image_request) {
        set_entry(&env, "SHIFTER_IMAGEREQUEST", 20, image_request);
    } else {
        char *request;
        if (asprintf(&request, "id:%s", image) < 0)
            fail("environment", "out of memory");
        set_entry(&env, "SHIFTER_IMAGEREQUEST", 20, request);
    }
    set_entry(&env, "SHIFTER_IMAGE", 13, image);
    for (char *op = plan.operations; op < plan.end; op += strlen(op) + 1)
        apply_operation(&env, op);
    cwd = getcwd(NULL, 0);

    {
        char *userns_path, *root;
        if (asprintf(&userns_path, "%s/userns", dir) < 0 || asprintf(&root, "%s/root", dir) < 0)
            python_launcher(argv);
        userns = open(userns_path, O_RDONLY | O_CLOEXEC);
        if (userns < 0 || setns(userns, CLONE_NEWUSER) != 0)
            python_launcher(argv);  /* nothing changed yet: the Python launcher reports it */
        close(userns);
        if (chroot(root) != 0) {
            char what[4200];
            snprintf(what, sizeof what, "cannot enter the job's environment %s", dir);
            fail(what, strerror(errno));
        }
    }
    /* the caller's directory when the container has it, else the image's WORKDIR, else / */
    if ((!cwd || chdir(cwd) != 0) && chdir(*plan.workdir ? plan.workdir : "/") != 0 && chdir("/") != 0)
        fail("cannot change to /", strerror(errno));
    drop_privileges(last_cap);
    run(argv + 1, &env);
}
