/* mpi_ring: the MPI test program of the local cluster's demo/mpich image.
 *
 * Every rank prints exactly one line:
 *
 *   mpi_ring rank=R size=S host=H ring=ok|BAD all_pairs=ok|BAD local_size=L local_peer=P
 *            local_peer_host=PH local_exchange=ok|BAD|alone libmpi=PATH
 *
 * - ring: a token goes 0 -> 1 -> ... -> S-1 -> 0, each rank adding its rank; every rank checks
 *   the value it receives (rank 0 checks the full sum when the token comes back).
 * - all_pairs: every rank exchanged its rank with every other rank directly.
 * - local: the ranks that share a node (MPI_COMM_TYPE_SHARED) exchange their rank and host
 *   name with their node-local neighbour; the exchange is ok when the neighbour reports the
 *   same host name.
 * - libmpi: the file the MPI library was mapped from (/proc/self/maps), so a test can tell the
 *   image's library from one a site module injected.
 *
 * Exit status: 0 when every check of this rank passed, 1 otherwise.
 *
 * MPI_Finalize is bounded (MPI_RING_FINALIZE_TIMEOUT seconds, default 5, 0 = unbounded): Debian
 * 12's MPICH 4.0.2 over UCX 1.13's TCP transport can deadlock there, one rank flushing a
 * connection while its peer already waits in the PMI barrier (openucx/ucx#8738; about one run
 * in four on the local cluster).  Every check is done and printed before, so a rank that hits
 * it says so on stderr and exits with its checks' status.
 */
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HOST_LEN 256
#define FINALIZE_TIMEOUT_DEFAULT 5

static volatile sig_atomic_t exit_status = 1;

static void finalize_timed_out(int sig)
{
    static const char message[] = "mpi_ring: MPI_Finalize did not return in time (MPICH/UCX TCP finalize "
                                  "deadlock, openucx/ucx#8738): exiting with the checks' status\n";
    ssize_t ignored;

    (void)sig;
    ignored = write(2, message, sizeof message - 1);
    (void)ignored;
    _exit(exit_status);
}

static unsigned finalize_timeout(void)
{
    const char *text = getenv("MPI_RING_FINALIZE_TIMEOUT");

    return text ? (unsigned)strtoul(text, NULL, 10) : FINALIZE_TIMEOUT_DEFAULT;
}

static void mapped_mpi_library(char *path, size_t size)
{
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[4096];

    snprintf(path, size, "unknown");
    if (!maps)
        return;
    while (fgets(line, sizeof line, maps)) {
        char *file = strchr(line, '/');
        if (file && (strstr(file, "/libmpich.so") || strstr(file, "/libmpi.so"))) {
            file[strcspn(file, "\n")] = '\0';
            snprintf(path, size, "%s", file);
            break;
        }
    }
    fclose(maps);
}

static int ring(int rank, int size)
{
    long token = 0, expected;
    int ok;

    if (size == 1)
        return 1;
    if (rank == 0) {
        MPI_Send(&token, 1, MPI_LONG, 1, 0, MPI_COMM_WORLD);
        MPI_Recv(&token, 1, MPI_LONG, size - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        expected = (long)size * (size - 1) / 2;
    } else {
        MPI_Recv(&token, 1, MPI_LONG, rank - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        expected = (long)rank * (rank - 1) / 2;
        ok = token == expected;
        token += rank;
        MPI_Send(&token, 1, MPI_LONG, (rank + 1) % size, 0, MPI_COMM_WORLD);
        return ok;
    }
    return token == expected;
}

/* Every pair of ranks exchanges its ranks directly (offset by offset, MPI_Sendrecv), so every
 * rank has talked to every other one, and every connection is complete in both directions
 * before MPI_Finalize (UCX 1.13's TCP transport can hang in finalize flushing a connection
 * only one side has used; openucx/ucx#8738). */
static int all_pairs(int rank, int size)
{
    int offset, ok = 1;

    for (offset = 1; offset < size; offset++) {
        int to = (rank + offset) % size, from = (rank - offset + size) % size, got = -1;
        MPI_Sendrecv(&rank, 1, MPI_INT, to, 3, &got, 1, MPI_INT, from, 3, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        ok = ok && got == from;
    }
    return ok;
}

int main(int argc, char **argv)
{
    int rank, size, local_rank, local_size, ring_ok, pairs_ok, peer_rank = -1, ok;
    char host[HOST_LEN] = "", peer_host[HOST_LEN] = "-", library[1024];
    const char *local_state = "alone";
    MPI_Comm local;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host - 1);
    mapped_mpi_library(library, sizeof library);

    ring_ok = ring(rank, size);

    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
    MPI_Comm_rank(local, &local_rank);
    MPI_Comm_size(local, &local_size);
    if (local_size > 1) {
        int next = (local_rank + 1) % local_size, prev = (local_rank + local_size - 1) % local_size;
        MPI_Sendrecv(&rank, 1, MPI_INT, next, 1, &peer_rank, 1, MPI_INT, prev, 1, local, MPI_STATUS_IGNORE);
        MPI_Sendrecv(host, HOST_LEN, MPI_CHAR, next, 2, peer_host, HOST_LEN, MPI_CHAR, prev, 2, local,
                     MPI_STATUS_IGNORE);
        local_state = strcmp(peer_host, host) == 0 && peer_rank != rank ? "ok" : "BAD";
    }
    MPI_Comm_free(&local);

    pairs_ok = all_pairs(rank, size);
    ok = ring_ok && pairs_ok && strcmp(local_state, "BAD") != 0;
    printf("mpi_ring rank=%d size=%d host=%s ring=%s all_pairs=%s local_size=%d local_peer=%d "
           "local_peer_host=%s local_exchange=%s libmpi=%s\n", rank, size, host, ring_ok ? "ok" : "BAD",
           pairs_ok ? "ok" : "BAD", local_size, peer_rank,
           peer_host, local_state, library);
    fflush(stdout);
    MPI_Barrier(MPI_COMM_WORLD);
    exit_status = ok ? 0 : 1;
    signal(SIGALRM, finalize_timed_out);
    alarm(finalize_timeout());
    MPI_Finalize();
    alarm(0);
    return ok ? 0 : 1;
}
