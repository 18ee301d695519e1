# Scenario qemu-disk: the export is the guest's own disk, /dev/vda, through QEMU's NBD client and
# virtio-blk (the host runs qemu-system-x86_64 -drive file=nbd://...). No nbd-client in the guest.
#
# 1. log the size the guest sees (size-bytes=N);
# 2. raw I/O: the 4 MiB pattern of kernel-client.sh, O_DIRECT, at the LAST 4 MiB, read back;
# 3. mke2fs -t ext4 -E nodiscard on the rest, mount, write kernel-client.sh's file tree, sync,
#    umount; drop the guest's caches, e2fsck -fn, mount read-only and check every file's md5.
# The guest then powers off; the host checks what reached the export after QEMU has exited.

. /scenarios/kernel-client.sh   # make_tree, check_pattern, PATTERN_TAG, PATTERN_RECORDS

scenario() {
  dev=/dev/vda
  wait_for 30 "$dev" test -b "$dev"
  size=$(blockdev --getsize64 "$dev") || fail "blockdev --getsize64 $dev"
  say "size-bytes=$size"
  say "sysfs-size-sectors=$(cat /sys/block/vda/size)"
  say "logical-block-size=$(cat /sys/block/vda/queue/logical_block_size)"
  [ "$size" -ge $((16 * MiB)) ] || fail "disk too small for this scenario: $size bytes"

  gen "$PATTERN_TAG" "$PATTERN_RECORDS" >/tmp/pattern
  PATTERN_MD5=$(md5 /tmp/pattern)
  say "pattern-md5=$PATTERN_MD5"
  tail=$((size - PATTERN_RECORDS * 512))
  say "pattern-offset=$tail"
  run dd if=/tmp/pattern of="$dev" bs=131072 seek="$tail" oflag=seek_bytes,direct conv=notrunc,fsync
  check_pattern "$dev" "$tail" "after writing"

  fs_kib=$((tail / 1024))
  run /sbin/mke2fs -t ext4 -E nodiscard -F "$dev" "${fs_kib}k"
  run mount -t ext4 "$dev" /mnt
  make_tree /tmp/src
  (cd /tmp/src && find . -type f | sort | xargs md5sum) >/tmp/sums
  nfiles=$(wc -l </tmp/sums)
  run cp -a /tmp/src/. /mnt/
  run sync
  while read -r sum path; do say "file-md5 $sum ${path#./}"; done </tmp/sums
  run umount /mnt

  echo 3 >/proc/sys/vm/drop_caches   # what follows is read through QEMU from the server
  run /sbin/e2fsck -fn "$dev"
  run mount -t ext4 -o ro "$dev" /mnt
  cd /mnt || fail "cd /mnt"
  run md5sum -c /tmp/sums
  cd / || fail "cd /"
  found=$(find /mnt -type f | wc -l)
  [ "$found" -eq "$nfiles" ] || fail "found $found files on the remounted fs, wrote $nfiles"
  run umount /mnt
  check_pattern "$dev" "$tail" "after remounting"
  run sync
  say "qemu-disk: all checks passed"
}
