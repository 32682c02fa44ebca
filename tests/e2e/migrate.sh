# e2e.test=migrate: sourced by /init (init.sh), whose helpers it uses. The guest keeps the
# disk and its page cache busy while the host migrates the running VM between QEMU
# processes (xtask/src/e2e/migrate.rs); every byte it reads is checked.
#
# /dev/vda (4 KiB blocks):
#   block 0             VU-E2E-HOST <nonce> (written by the host)
#   block 1             control, written by the host: VU-MIG-MOVED <nonce> <k> after its
#                       k-th migration, VU-MIG-STOP <nonce> after the last one
#   block 2             the guest's final marker, VU-MIG-DONE <nonce> <rounds>
#   blocks 64..79       slot r % 16 holds VU-MIG-D <nonce> <r> (O_DIRECT) after round r
#   1 MiB .. 9 MiB      16 regions of 512 KiB: region r % 16 holds "VU-MIG-P <nonce> <r>"
#                       lines after round r
#   10 MiB + 64 KiB * s slot s = r % 16: "VU-MIG-B <nonce> <r>" lines (through the page cache)
#
# Each round writes its O_DIRECT block and reads it back, writes its 64 KiB through the page
# cache with fsync and reads it back, then writes its region with O_DIRECT (which drops the
# region's old pages from the page cache) and reads it back through the page cache: the
# device writes those 128 pages by DMA, into pages the kernel just freed. Nothing writes a
# region's cached pages again until the region is refilled 16 rounds later. After each
# migration the host says so in the control block, and the guest hashes all 16 regions from
# its page cache: a page the backend wrote during the migration without logging it (so the
# destination holds what the page held before) is read back there, whenever the switch-over
# came, as long as the migration lasted fewer than about 14 rounds.

MIG_SLOTS=16
MIG_REGIONS=16
# A region, in 64 KiB blocks.
MIG_REGION_BLOCKS=8

mig_fail() {
    say "VU-E2E-FAIL migrate $*"
    finish
}

# The 64 KiB-block offset of region $1.
mig_region_at() {
    echo $((16 + MIG_REGION_BLOCKS * $1))
}

# Checks region $1 against the sha256 of its last fill, read through the page cache (or
# O_DIRECT if $2 is "direct"); $3 says which read it was. A region not filled yet passes.
mig_check_region() {
    eval "want=\$sum_$1"
    [ -n "$want" ] || return 0
    at="$(mig_region_at "$1")"
    if [ "$2" = direct ]; then
        got="$(dd if=/dev/vda bs=65536 skip="$at" count="$MIG_REGION_BLOCKS" iflag=direct 2>/dev/null | sha256sum)"
    else
        got="$(dd if=/dev/vda bs=65536 skip="$at" count="$MIG_REGION_BLOCKS" 2>/dev/null | sha256sum)"
    fi
    [ "${got%% *}" = "$want" ] || mig_fail "data: round $round: region $1 ($3) has sha256 ${got%% *}, not $want"
}

# Checks every region filled so far, $1 ("cached" or "direct") as mig_check_region's $2.
mig_check_regions() {
    r=0
    while [ "$r" -lt "$MIG_REGIONS" ]; do
        mig_check_region "$r" "$1" "$2"
        r=$((r + 1))
    done
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

    region=$((round % MIG_REGIONS))
    yes "VU-MIG-P $nonce $round" | head -c $((MIG_REGION_BLOCKS * 65536)) > /tmp/region
    sum="$(sha256sum < /tmp/region)"
    eval "sum_$region=${sum%% *}"
    dd if=/tmp/region of=/dev/vda bs=65536 seek="$(mig_region_at "$region")" count="$MIG_REGION_BLOCKS" \
        oflag=direct conv=notrunc 2>/dev/null || mig_fail "round $round: O_DIRECT write of region $region failed"
    mig_check_region "$region" cached "read by the device into the page cache"
}

test_migrate() {
    wait_for /dev/vda || fail "no /dev/vda"
    # Held open for the whole test: Linux drops a block device's page cache when its last
    # opener closes it (every dd would otherwise read from the device again).
    exec 3< /dev/vda
    host="$(read_block 0 0)"
    [ "$host" = "VU-E2E-HOST $nonce" ] || mig_fail "sector 0 holds '$host'"
    # With e2e.packed=1 (--packed): fails unless the device negotiated packed virtqueues.
    check_packed
    round=0
    checked=0
    say "VU-MIG-READY $nonce"
    stop="VU-MIG-STOP $nonce"
    while :; do
        round=$((round + 1))
        mig_round
        echo "VU-MIG-ROUND $nonce $round"
        control="$(read_block 0 1)"
        [ "$control" = "$stop" ] && break
        case "$control" in
            "VU-MIG-MOVED $nonce "*)
                moved="${control##* }"
                if [ "$moved" != "$checked" ]; then
                    mig_check_regions cached "after migration $moved, from the page cache"
                    checked="$moved"
                    echo "VU-MIG-CHECKED $nonce $moved at round $round"
                fi
                ;;
        esac
    done
    # Every region once more after the last migration, from the cache and from the disk.
    mig_check_regions cached "final, page cache"
    mig_check_regions direct "final, O_DIRECT"
    printf '%s' "VU-MIG-DONE $nonce $round" | dd of=/tmp/done bs=4096 count=1 conv=sync 2>/dev/null
    dd if=/tmp/done of=/dev/vda bs=4096 seek=2 count=1 oflag=direct conv=notrunc 2>/dev/null \
        || mig_fail "final marker write failed"
    sync
    say "VU-E2E-PASS migrate $nonce rounds=$round"
}
