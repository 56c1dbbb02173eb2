/* A fake nvidia-smi (fake_gpu tests): prints which GPU device nodes it can see and which
 * libnvidia-ml it was linked with at run time, as the real one would report the driver. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

const char *fake_driver_version(void);
const char *fake_driver_file(void);

static void show(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) {
        printf("%s absent\n", path);
    } else if (S_ISCHR(st.st_mode)) {
        printf("%s char %u:%u\n", path, major(st.st_rdev), minor(st.st_rdev));
    } else {
        int fd = open(path, O_RDONLY);
        printf("%s hidden %s\n", path, fd < 0 ? strerror(errno) : "readable");
        if (fd >= 0) close(fd);
    }
}

int main(void) {
    char path[64];
    printf("driver %s from %s\n", fake_driver_version(), fake_driver_file());
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "/dev/nvidia%d", i);
        show(path);
    }
    show("/dev/nvidiactl");
    show("/dev/nvidia-uvm");
    return 0;
}
