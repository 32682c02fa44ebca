# e2e.test=restart: sourced by /init (init.sh), whose helpers it uses. Several workers keep
# O_DIRECT writes and reads in flight on every queue while the host kills or stops the
# backend and starts a new one on the same socket (xtask/src/e2e/restart.rs); every byte
# read back is checked, and no request may fail.
#
# Kernel command line: e2e.workers=N (parallel workers, worker w on vCPU w % ncpu).
#
# /dev/vda (4 KiB blocks):
#   block 0                  VU-E2E-HOST <nonce> (written by the host)
#   block 1                  control: the host writes VU-RS-STOP <nonce> after its restarts
#   block 2                  the guest's final marker, VU-RS-DONE <nonce> <rounds of each worker>
#   1 MiB + w * 512 KiB      worker w's region: after its round r it holds 512 KiB of
#                            "VU-RS <nonce> w<w> r<r>" lines
#
# A round writes the region with one 512 KiB O_DIRECT write (more than one request: the
# device takes at most 126 segments), reads it back with O_DIRECT and compares the sha256.

RS_REGION=524288
# The region of worker w starts at this many regions from the start of the disk, plus w.
RS_FIRST=2

rs_worker() {
    w="$1"
    cpu=$((w % ncpu))
    r=0
    while [ ! -e /tmp/rs-stop ]; do
        r=$((r + 1))
        yes "VU-RS $nonce w$w r$r" | head -c "$RS_REGION" > "/tmp/rs-p$w"
        want="$(sha256sum < "/tmp/rs-p$w")"
        if ! taskset -c "$cpu" dd if="/tmp/rs-p$w" of=/dev/vda bs="$RS_REGION" \
            seek=$((RS_FIRST + w)) count=1 oflag=direct conv=notrunc 2> "/tmp/rs-e$w"; then
            echo "worker $w round $r: O_DIRECT write failed: $(cat "/tmp/rs-e$w")" > "/tmp/rs-f$w"
            return 1
        fi
        got="$(taskset -c "$cpu" dd if=/dev/vda bs="$RS_REGION" skip=$((RS_FIRST + w)) count=1 \
            iflag=direct 2>/dev/null | sha256sum)"
        if [ "$got" != "$want" ]; then
            echo "data: worker $w round $r reads back sha256 ${got%% *}, wrote ${want%% *}" \
                > "/tmp/rs-f$w"
            return 1
        fi
        echo "$r ${want%% *}" > "/tmp/rs-r$w"
    done
}

rs_fail() {
    say "VU-E2E-FAIL restart $*"
    finish
}

# The first failure a worker reported, if any.
rs_failure() {
    for f in /tmp/rs-f*; do
        [ -e "$f" ] && { cat "$f"; return 0; }
    done
    return 1
}

test_restart() {
    wait_for /dev/vda || rs_fail "no /dev/vda"
    host="$(read_block 0 0)"
    [ "$host" = "VU-E2E-HOST $nonce" ] || rs_fail "sector 0 holds '$host'"
    workers=1
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
            e2e.workers=*) workers="${arg#*=}" ;;
        esac
    done
    ncpu="$(nproc)"
    w=0
    pids=""
    while [ "$w" -lt "$workers" ]; do
        rs_worker "$w" &
        pids="$pids $!"
        w=$((w + 1))
    done
    say "VU-RS-READY $nonce workers=$workers"
    stop="VU-RS-STOP $nonce"
    while :; do
        why="$(rs_failure)" && { touch /tmp/rs-stop; rs_fail "$why"; }
        [ "$(read_block 0 1)" = "$stop" ] && break
        sleep 0.1
    done
    touch /tmp/rs-stop
    for pid in $pids; do
        wait "$pid"
    done
    why="$(rs_failure)" && rs_fail "$why"
    # Each worker's last round was read back after the last restart; the host checks every
    # region in the image after power-off.
    rounds=""
    total=0
    w=0
    while [ "$w" -lt "$workers" ]; do
        [ -e "/tmp/rs-r$w" ] || rs_fail "worker $w finished no round"
        read -r r _ < "/tmp/rs-r$w"
        rounds="$rounds $r"
        total=$((total + r))
        w=$((w + 1))
    done
    printf '%s' "VU-RS-DONE $nonce$rounds" | dd of=/tmp/rs-done bs=4096 count=1 conv=sync 2>/dev/null
    dd if=/tmp/rs-done of=/dev/vda bs=4096 seek=2 count=1 oflag=direct conv=notrunc 2>/dev/null \
        || rs_fail "final marker write failed"
    sync
    bad="$(dmesg | grep -iE 'error|not a head|corrupt|BUG:|WARNING:|blocked for more' | head -5)"
    [ -z "$bad" ] || rs_fail "kernel log: $(echo "$bad" | tr '\n' '|')"
    say "VU-E2E-PASS restart $nonce queues=$(ls /sys/block/vda/mq | wc -l) rounds=$total"
}
