/* The node lab's workload: echoes UDP datagrams and TCP streams on one port (argv[1]), a
 * child process per TCP connection. Built static (cc -static) into the lab's echo image, whose
 * busybox has no UDP server applet. */
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int bound(int type, int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    int one = 1, s = socket(AF_INET, type, 0);
    if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        exit(1);
    return s;
}

static void echo_stream(int c) {
    char buf[65536];
    ssize_t n;
    while ((n = read(c, buf, sizeof buf)) > 0)
        if (write(c, buf, n) != n)
            break;
    exit(0);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7;
    int udp = bound(SOCK_DGRAM, port), tcp = bound(SOCK_STREAM, port);
    static char buf[65536];
    struct pollfd fds[2] = {{.fd = udp, .events = POLLIN}, {.fd = tcp, .events = POLLIN}};
    signal(SIGCHLD, SIG_IGN); /* no zombies */
    if (listen(tcp, 64) < 0)
        return 1;
    for (;;) {
        if (poll(fds, 2, -1) < 0)
            continue;
        if (fds[0].revents & POLLIN) {
            struct sockaddr_in from;
            socklen_t len = sizeof from;
            ssize_t n = recvfrom(udp, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
            if (n >= 0)
                sendto(udp, buf, n, 0, (struct sockaddr *)&from, len);
        }
        if (fds[1].revents & POLLIN) {
            int c = accept(tcp, NULL, NULL);
            if (c >= 0 && fork() == 0)
                echo_stream(c);
            if (c >= 0)
                close(c);
        }
    }
}
