# Scenario kernel-client: the Linux kernel's NBD client on /dev/nbd0 against the server.
#
# Parameters: nbdtest.mode=netlink (default) | ioctl.
# 1. attach with nbd-client (-t 60; -L for ioctl), log the size the kernel sees (size-bytes=N);
# 2. raw I/O: write a 4 MiB pattern (gen nbdtest-tail 8192) with O_DIRECT to the LAST 4 MiB of the
#    device and read it back with O_DIRECT (the start of the device is the file system's);
# 3. mke2fs -t ext4 -E nodiscard on the rest of the device, mount, write a file tree (the same one
#    tests/vm/guest.py:EXT4_FILES describes), sync, umount;
# 4. detach and attach again (so what follows comes from the server, not the guest's page cache),
#    e2fsck -fn, mount, check every file's md5, umount, check the pattern again, detach.
# The host then checks the backing file: the pattern at its end, e2fsck, and files via debugfs.

PATTERN_TAG=nbdtest-tail
PATTERN_RECORDS=8192   # x 512 bytes = 4 MiB

make_tree() {  # make_tree DIR: the file tree, mirrored by guest.py:EXT4_FILES
  mkdir -p "$1/tree/sub/deep"
  echo "hello from the nbdcrypt kernel client test" >"$1/hello.txt"
  gen file-one 2048 >"$1/tree/one.bin"       # 1 MiB
  gen file-two 3073 >"$1/tree/sub/two.bin"   # 1.5 MiB + 512 bytes
  i=1
  while [ "$i" -le 16 ]; do
    echo "small file $i" >"$1/tree/sub/deep/small-$i.txt"
    i=$((i + 1))
  done
  : >"$1/tree/empty"
}

check_pattern() {  # check_pattern DEV OFFSET WHEN
  rm -f /tmp/readback
  run dd if="$1" of=/tmp/readback bs=131072 skip="$2" count=32 iflag=skip_bytes,direct
  got=$(md5 /tmp/readback)
  [ "$got" = "$PATTERN_MD5" ] || fail "pattern read back $3 differs: md5 $got, wrote $PATTERN_MD5"
  say "pattern read back $3: ok"
}

scenario() {
  dev=/dev/nbd0
  mode=$(param mode netlink)

  nbd_connect "$dev" "$mode"
  size=$(blockdev --getsize64 "$dev") || fail "blockdev --getsize64 $dev"
  say "size-bytes=$size"
  say "sysfs-size-sectors=$(nbd_size "$dev")"
  [ "$size" -ge $((16 * MiB)) ] || fail "device too small for this scenario: $size bytes"

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

  nbd_disconnect "$dev"
  nbd_connect "$dev" "$mode"
  run /sbin/e2fsck -fn "$dev"
  run mount -t ext4 -o ro "$dev" /mnt
  cd /mnt || fail "cd /mnt"
  run md5sum -c /tmp/sums
  cd / || fail "cd /"
  found=$(find /mnt -type f | wc -l)
  [ "$found" -eq "$nfiles" ] || fail "found $found files on the remounted fs, wrote $nfiles"
  run umount /mnt
  check_pattern "$dev" "$tail" "after reattaching"
  nbd_disconnect "$dev"
  say "kernel-client $mode: all checks passed"
}
