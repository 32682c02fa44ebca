#!/bin/sh
# /init of the `cargo xtask e2e` guest (busybox sh, run as PID 1 from the initramfs).
#
# The host passes the test on the kernel command line:
#   e2e.test=blk|rng|net  which device to exercise; `demo`: the filesystem walk of
#                      `cargo xtask demo`; `shell`: an interactive shell (`demo --shell`);
#                      `migrate`: /migrate.sh, the guest of `cargo xtask e2e --migrate`;
#                      `restart`: /restart.sh, the guest of `cargo xtask e2e --restart`
#   e2e.nonce=HEX      fresh for every boot, so that a stale console log cannot pass
#   e2e.sum=HEX        (blk) sha256 of the 2 MiB pattern the host wrote at 1 MiB;
#                      (net) sha256 of the bytes the host's peer sends
#   e2e.net=GUEST/LEN,HOST,UP,DOWN,BYTES
#                      (net) the guest's address and prefix length, the host's address,
#                      the peer's upload and download TCP ports, and how many bytes to upload
#   e2e.packed=1       the device has packed=on: every virtio device must have negotiated
#                      VIRTIO_F_RING_PACKED (feature bit 34)
#   e2e.iommu=1        (blk) the device sits behind QEMU's intel-iommu (booted intel_iommu=on):
#                      its PCI function must be in an IOMMU group, dmesg must have DMAR lines
#                      and the device must have negotiated VIRTIO_F_ACCESS_PLATFORM (bit 33)
# and reads the verdict back from the serial console: the guest prints
#   VU-E2E-PASS <test> <nonce>    when every check here passed
#   VU-E2E-FAIL <test> <reason>   otherwise
# then powers off. The host makes its own checks after power-off (docs/e2e.md).
# On the way it marks its progress, so that a boot stopped at a deadline says how far it got:
#   VU-E2E-STAGE <nonce> init|modules|device|workload <guest uptime in s>

/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

test=none
nonce=none
sum=none
packed=0
iommu=0
net=none
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        e2e.test=*) test="${arg#*=}" ;;
        e2e.nonce=*) nonce="${arg#*=}" ;;
        e2e.sum=*) sum="${arg#*=}" ;;
        e2e.packed=*) packed="${arg#*=}" ;;
        e2e.iommu=*) iommu="${arg#*=}" ;;
        e2e.net=*) net="${arg#*=}" ;;
    esac
done

# A progress marker: the stage and the guest's uptime, read with builtins only (no fork).
# Not on the terminal of `demo --shell`, which has no deadline.
stage() {
    [ "$test" = shell ] && return
    read -r uptime _ < /proc/uptime
    echo "VU-E2E-STAGE $nonce $1 $uptime"
}

stage init

# Printed both on the console tty and through printk: printk writes to the serial console
# synchronously, so the line is out before `poweroff -f` stops the machine.
say() {
    echo "$*"
    echo "<1>$*" > /dev/kmsg
}

finish() {
    sync
    poweroff -f
    # Not reached; if it were, PID 1 exiting panics the kernel and panic=-1 ends QEMU.
    exit 1
}

fail() {
    say "VU-E2E-FAIL $test $*"
    finish
}

# The initramfs holds the virtio modules this kernel builds as modules, numbered in
# dependency order by the xtask (modules.dep order, dependencies first).
for ko in /lib/modules/*.ko; do
    [ -e "$ko" ] || break
    insmod "$ko" || fail "insmod $ko"
done
stage modules

# Waits up to 10 s for a device node to appear.
wait_for() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        [ "$i" -gt 100 ] && return 1
        sleep 0.1
    done
    return 0
}

# Reads one 4 KiB block of /dev/vda with O_DIRECT on cpu $1 and prints it without the NUL
# padding.
read_block() {
    taskset -c "$1" dd if=/dev/vda bs=4096 skip="$2" count=1 iflag=direct 2>/dev/null | tr -d '\000'
}

# One worker per vCPU, pinned, so that with several queues every queue carries requests.
blk_worker() {
    cpu="$1"
    mark="VU-E2E-GUEST $nonce cpu$cpu"
    printf '%s' "$mark" | dd of="/tmp/mark$cpu" bs=4096 count=1 conv=sync 2>/dev/null
    taskset -c "$cpu" dd if="/tmp/mark$cpu" of=/dev/vda bs=4096 seek=$((1 + cpu)) count=1 \
        oflag=direct conv=notrunc 2>/dev/null || { echo "cpu$cpu: O_DIRECT write failed"; return 1; }
    back="$(read_block "$cpu" $((1 + cpu)))"
    [ "$back" = "$mark" ] || { echo "cpu$cpu: read back '$back'"; return 1; }
    # 2 MiB of pattern in 64 KiB O_DIRECT reads: many multi-segment requests.
    got="$(taskset -c "$cpu" dd if=/dev/vda bs=65536 skip=16 count=32 iflag=direct 2>/dev/null | sha256sum)"
    [ "${got%% *}" = "$sum" ] || { echo "cpu$cpu: pattern sha256 ${got%% *}"; return 1; }
    return 0
}

# With e2e.packed=1: fails unless every virtio device negotiated packed virtqueues. The
# driver's `features` file has one character per feature bit, bit 0 first.
check_packed() {
    rings=""
    [ "$packed" = 1 ] || return 0
    n=0
    for f in /sys/bus/virtio/devices/*/features; do
        [ -e "$f" ] || fail "no virtio device to check for packed rings"
        bit="$(cut -c35 "$f")"
        [ "$bit" = 1 ] || fail "$f: VIRTIO_F_RING_PACKED (bit 34) not negotiated: $(cat "$f")"
        n=$((n + 1))
    done
    rings="packed=$n"
}

# With e2e.iommu=1: fails unless /dev/vda's PCI function is in an IOMMU group, the DMAR
# driver logged, and the device negotiated VIRTIO_F_ACCESS_PLATFORM.
check_iommu() {
    behind=""
    [ "$iommu" = 1 ] || return 0
    # /sys/block/vda/device is the virtio device; its parent is the PCI function.
    group="$(readlink /sys/block/vda/device/../iommu_group)" \
        || fail "/dev/vda's PCI function has no iommu_group"
    dmar="$(dmesg | grep -c DMAR)"
    [ "$dmar" -gt 0 ] || fail "no DMAR lines in dmesg"
    bit="$(cut -c34 /sys/block/vda/device/features)"
    [ "$bit" = 1 ] || fail "VIRTIO_F_ACCESS_PLATFORM (bit 33) not negotiated"
    behind="iommu_group=${group##*/} dmar_lines=$dmar"
}

test_blk() {
    wait_for /dev/vda || fail "no /dev/vda"
    stage device
    host="$(read_block 0 0)"
    [ "$host" = "VU-E2E-HOST $nonce" ] || fail "sector 0 holds '$host'"
    ncpu="$(nproc)"
    cpu=0
    pids=""
    while [ "$cpu" -lt "$ncpu" ]; do
        blk_worker "$cpu" > "/tmp/worker$cpu.log" 2>&1 &
        pids="$pids $!"
        cpu=$((cpu + 1))
    done
    bad=0
    for pid in $pids; do
        wait "$pid" || bad=1
    done
    if [ "$bad" -ne 0 ]; then
        fail "$(cat /tmp/worker*.log | tr '\n' ' ')"
    fi
    stage workload
    sync
    blockdev --flushbufs /dev/vda 2>/dev/null
    check_packed
    check_iommu
    say "VU-E2E-PASS blk $nonce queues=$(ls /sys/block/vda/mq | wc -l) cpus=$ncpu $rings $behind"
}

test_rng() {
    # /dev/hwrng exists as soon as the hw_random core does; wait for virtio_rng to be the
    # current source.
    i=0
    while :; do
        current="$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
        case "$current" in
            virtio_rng*) break ;;
        esac
        i=$((i + 1))
        [ "$i" -gt 100 ] && fail "current hwrng is '$current'"
        sleep 0.1
    done
    stage device
    # Stop the kernel's own reader (khwrngd) so that what we read is one contiguous run of
    # the backend's stream.
    echo 0 > /sys/class/misc/hw_random/rng_quality 2>/dev/null
    hex="$(dd if=/dev/hwrng bs=64 count=4 iflag=fullblock 2>/dev/null | od -An -v -tx1 | tr -d ' \n')"
    [ "${#hex}" -eq 512 ] || fail "read ${#hex} hex digits from /dev/hwrng"
    stage workload
    say "VU-E2E-RNG $nonce $hex"
    check_packed
    say "VU-E2E-PASS rng $nonce $rings"
}

# The first network interface other than lo.
first_netdev() {
    for dev in /sys/class/net/*; do
        name="${dev##*/}"
        [ "$name" = lo ] || { echo "$name"; return 0; }
    done
    return 1
}

# net: configures the interface, pings the host end of the tap (in a network namespace on
# the host), then moves data over TCP both ways at once: the host's peer sends its pattern
# (the guest compares its sha256 with e2e.sum) while the guest uploads BYTES from
# /dev/urandom (the peer answers `got N`; the host compares the sha256 the guest prints
# with that of what it received).
test_net() {
    old_ifs="$IFS"
    IFS=,
    set -- $net
    IFS="$old_ifs"
    [ "$#" -eq 5 ] || fail "e2e.net=$net: want GUEST/LEN,HOST,UP,DOWN,BYTES"
    guest="$1" host="$2" up="$3" down="$4" bytes="$5"
    i=0
    until dev="$(first_netdev)"; do
        i=$((i + 1))
        [ "$i" -gt 100 ] && fail "no network interface"
        sleep 0.1
    done
    stage device
    ip link set lo up
    ip addr add "$guest" dev "$dev" || fail "ip addr add $guest dev $dev"
    ip link set "$dev" up || fail "ip link set $dev up"
    # The first echo may wait for ARP and the link; 3 tries of up to 3 s each.
    i=0
    until ping -c 1 -W 3 "$host" > /tmp/ping.log 2>&1; do
        i=$((i + 1))
        [ "$i" -ge 3 ] && fail "ping $host: $(tr '\n' ' ' < /tmp/ping.log)"
    done
    dd if=/dev/urandom of=/tmp/up bs=65536 count=$((bytes / 65536)) 2>/dev/null
    up_sum="$(sha256sum < /tmp/up)"
    up_sum="${up_sum%% *}"
    # The download on the first vCPU, the upload on the last: with a queue pair per vCPU the
    # driver picks a TX queue by the sending vCPU, and the tap answers a flow on the queue it
    # last came from, so both pairs carry traffic both ways (the host checks that).
    last_cpu=$(($(nproc) - 1))
    taskset -c 0 nc "$host" "$down" < /dev/null > /tmp/down 2>/tmp/down.err &
    down_pid=$!
    taskset -c "$last_cpu" nc "$host" "$up" < /tmp/up > /tmp/up.ack 2>/tmp/up.err \
        || fail "upload: $(cat /tmp/up.err)"
    wait "$down_pid" || fail "download: $(cat /tmp/down.err)"
    stage workload
    ack="$(cat /tmp/up.ack)"
    [ "$ack" = "got $bytes" ] || fail "upload: the host's peer answered '$ack', not 'got $bytes'"
    got="$(sha256sum < /tmp/down)"
    [ "${got%% *}" = "$sum" ] || fail "download: $(wc -c < /tmp/down) bytes, sha256 ${got%% *}"
    say "VU-E2E-NET $nonce up=$up_sum down=$(wc -c < /tmp/down)"
    say "VU-E2E-PASS net $nonce queues=$(ls -d /sys/class/net/$dev/queues/rx-* | wc -l) dev=$dev"
}

# `cargo xtask demo`: a filesystem on the blank disk, a file written, unmounted, mounted
# again and read back. Each `VU-DEMO` line is shown by the xtask; the host then looks for the
# file's text in the image.
demo() {
    say "VU-DEMO $*"
}

test_demo() {
    wait_for /dev/vda || fail "no /dev/vda"
    stage device
    demo "Linux $(uname -r) sees /dev/vda, $(($(cat /sys/block/vda/size) / 2048)) MiB, driver virtio_blk"
    mke2fs -L vu-demo /dev/vda > /tmp/mkfs.log 2>&1 || fail "mke2fs: $(cat /tmp/mkfs.log)"
    demo "mke2fs -L vu-demo /dev/vda: an empty ext2 filesystem"
    mkdir -p /mnt
    mount -t ext2 /dev/vda /mnt || fail "mount"
    text="hello from the guest, boot $nonce"
    echo "$text" > /mnt/hello.txt || fail "write"
    sync
    umount /mnt || fail "umount"
    demo "mounted it, wrote /mnt/hello.txt ($(echo "$text" | wc -c) bytes), sync, umount"
    # Forget every cached page of the disk, so that the file is read from the device again.
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext2 -o ro /dev/vda /mnt || fail "mount again"
    back="$(cat /mnt/hello.txt)"
    demo "mounted it again, read back: \"$back\""
    demo "$(df -k /mnt | awk 'NR == 2 { print "df: " $3 " KiB used, " $4 " KiB free" }')"
    umount /mnt
    [ "$back" = "$text" ] || fail "read back '$back'"
    stage workload
    say "VU-DEMO-PASS $nonce"
}

# `cargo xtask demo --shell`: a shell on the console; leaving it powers off.
shell() {
    echo "vu e2e guest: $(ls /dev/vd* /dev/hwrng 2>/dev/null | tr '\n' ' ')"
    setsid cttyhack sh
}

case "$test" in
    blk) test_blk ;;
    rng) test_rng ;;
    net) test_net ;;
    demo) test_demo ;;
    migrate) . /migrate.sh && test_migrate ;;
    restart) . /restart.sh && test_restart ;;
    shell) shell ;;
    *) fail "unknown e2e.test '$test'" ;;
esac
finish
