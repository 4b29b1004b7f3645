/* Runs a command and prints "wall user sys maxrss_kib" from wait4(2): microsecond CPU times
 * (GNU time prints 10 ms ticks, and our runs take less than one) and a peak RSS that is the
 * command's own (a launcher that forks a big interpreter, such as Python's subprocess, passes
 * the interpreter's peak on to the child: Linux keeps the RSS high-water mark across exec).
 * Output goes to the file named by the first argument; the command's exit status is ours. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: rusage OUT COMMAND [ARG...]\n");
        return 64;
    }
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    pid_t pid = fork();
    if (pid == 0) {
        execvp(argv[2], argv + 2);
        perror(argv[2]);
        _exit(127);
    }
    int status = 0;
    struct rusage usage;
    if (pid < 0 || wait4(pid, &status, 0, &usage) < 0) {
        perror("rusage");
        return 70;
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    double wall = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
    FILE *out = fopen(argv[1], "w");
    if (!out) {
        perror(argv[1]);
        return 74;
    }
    fprintf(out, "%.4f %ld.%06ld %ld.%06ld %ld\n", wall, (long)usage.ru_utime.tv_sec, (long)usage.ru_utime.tv_usec,
            (long)usage.ru_stime.tv_sec, (long)usage.ru_stime.tv_usec, usage.ru_maxrss);
    fclose(out);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
