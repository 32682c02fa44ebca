# e2e.test=migrate: sourced by /init (init.sh), whose helpers it uses. The guest keeps the
# disk and its page cache busy while the host migrates the running VM between QEMU
# processes (xtask/src/e2e/migrate.rs); every byte it reads is checked.
#
# /dev/vda (4 KiB blocks):
#   block 0             VU-E2E-HOST <nonce> (written by the host)
#   block 1             control: the host writes VU-MIG-STOP <nonce> after its migrations
#   block 2             the guest's final marker, VU-MIG-DONE <nonce> <rounds>
#   blocks 64..79       slot r % 16 holds VU-MIG-D <nonce> <r> (O_DIRECT) after round r
#   1 MiB .. 5 MiB      half A: round r (even) fills it with "VU-MIG-P <nonce> <r>" lines
#   5 MiB .. 9 MiB      half B: the same for odd rounds
#   10 MiB + 64 KiB * s slot s = r % 16: "VU-MIG-B <nonce> <r>" lines (through the page cache)
#
# Each round writes its O_DIRECT block and reads it back, writes its 64 KiB through the page
# cache with fsync and reads it back, then writes its half with O_DIRECT (which also drops
# that half from the page cache) and reads it back through the page cache: the device writes
# those 1024 pages by DMA, into pages the kernel just freed, which held older rounds' data.
# Both halves are then hashed from the cache, twice, and this round's with O_DIRECT. The
# other half stays cached from the round before, so a page the backend wrote during a
# migration but did not log (it keeps an older round's data on the destination) is hashed
# after the switch-over whenever it happens during the next round or two.

MIG_SLOTS=16
MIG_HALF=4194304

mig_fail() {
    say "VU-E2E-FAIL migrate $*"
    finish
}

# The 64 KiB-block offset of half $1 (a or b).
mig_half_at() {
    case "$1" in
        a) echo 16 ;;
        b) echo 80 ;;
    esac
}

# Checks half $1 against sha256 $2, read through the page cache (or O_DIRECT if $3 is
# "direct"); $4 says which read it was.
mig_check_half() {
    at="$(mig_half_at "$1")"
    if [ "$3" = direct ]; then
        got="$(dd if=/dev/vda bs=65536 skip="$at" count=64 iflag=direct 2>/dev/null | sha256sum)"
    else
        got="$(dd if=/dev/vda bs=65536 skip="$at" count=64 2>/dev/null | sha256sum)"
    fi
    [ "${got%% *}" = "$2" ] || mig_fail "data: round $round: half $1 ($4) has sha256 ${got%% *}, not $2"
}

mig_round() {
    slot=$((round % MIG_SLOTS))
    mark="VU-MIG-D $nonce $round"
    printf '%s' "$mark" | dd of=/tmp/direct bs=4096 count=1 conv=sync 2>/dev/null
    dd if=/tmp/direct of=/dev/vda bs=4096 seek=$((64 + slot)) count=1 oflag=direct conv=notrunc 2>/dev/null \
        || mig_fail "round $round: O_DIRECT write failed"
    back="$(read_block 0 $((64 + slot)))"
    [ "$back" = "$mark" ] || mig_fail "data: round $round: O_DIRECT block reads back '$back'"

    yes "VU-MIG-B $nonce $round" | head -c 65536 > /tmp/buffered
    want="$(sha256sum < /tmp/buffered)"
    dd if=/tmp/buffered of=/dev/vda bs=65536 seek=$((160 + slot)) count=1 conv=notrunc,fsync 2>/dev/null \
        || mig_fail "round $round: buffered write failed"
    got="$(dd if=/dev/vda bs=65536 skip=$((160 + slot)) count=1 2>/dev/null | sha256sum)"
    [ "$got" = "$want" ] || mig_fail "data: round $round: buffered slot $slot reads back sha256 ${got%% *}"

    if [ $((round % 2)) -eq 0 ]; then half=a; else half=b; fi
    yes "VU-MIG-P $nonce $round" | head -c "$MIG_HALF" > /tmp/half
    sum="$(sha256sum < /tmp/half)"
    sum="${sum%% *}"
    eval "sum_$half=$sum"
    dd if=/tmp/half of=/dev/vda bs=65536 seek="$(mig_half_at "$half")" count=64 oflag=direct \
        conv=notrunc 2>/dev/null || mig_fail "round $round: O_DIRECT write of half $half failed"
    mig_check_half "$half" "$sum" cached "read by the device into the page cache"
    for pass in 1 2; do
        for other in a b; do
            eval "other_sum=\$sum_$other"
            [ -n "$other_sum" ] || continue
            mig_check_half "$other" "$other_sum" cached "from the page cache, pass $pass"
        done
    done
    mig_check_half "$half" "$sum" direct "O_DIRECT"
}

test_migrate() {
    wait_for /dev/vda || fail "no /dev/vda"
    host="$(read_block 0 0)"
    [ "$host" = "VU-E2E-HOST $nonce" ] || mig_fail "sector 0 holds '$host'"
    # With e2e.packed=1 (--packed): fails unless the device negotiated packed virtqueues.
    check_packed
    round=0
    say "VU-MIG-READY $nonce"
    stop="VU-MIG-STOP $nonce"
    while :; do
        round=$((round + 1))
        mig_round
        echo "VU-MIG-ROUND $nonce $round"
        [ "$(read_block 0 1)" = "$stop" ] && break
    done
    # The halves once more after the last migration, from the cache and from the disk.
    for half in a b; do
        eval "sum=\$sum_$half"
        [ -n "$sum" ] || continue
        mig_check_half "$half" "$sum" cached "final, page cache"
        mig_check_half "$half" "$sum" direct "final, O_DIRECT"
    done
    printf '%s' "VU-MIG-DONE $nonce $round" | dd of=/tmp/done bs=4096 count=1 conv=sync 2>/dev/null
    dd if=/tmp/done of=/dev/vda bs=4096 seek=2 count=1 oflag=direct conv=notrunc 2>/dev/null \
        || mig_fail "final marker write failed"
    sync
    say "VU-E2E-PASS migrate $nonce rounds=$round"
}
