# Scenario fault: the device fails under a mounted ext4 and comes back; synced data survives.
#
# The host watches the console and drives the fault with `nbdcrypt ctl` (load a flakey table that
# is always down, resume; later the linear table again, resume):
# 1. attach, mke2fs -t ext4 -E nodiscard, mount, write kernel-client.sh's file tree, sync;
#    say phase=synced (the host now injects the fault);
# 2. keep writing and syncing small files until a write or sync fails: say phase=saw-io-error
#    (the host now clears the fault); give up after nbdtest.fault_wait seconds;
# 3. wait until an O_DIRECT read of the device succeeds again (phase=fault-cleared), unmount
#    whatever state ext4 is in, detach, attach again;
# 4. e2fsck -fy replays the journal and repairs, then e2fsck -fn must find nothing; mount
#    read-only and check every file of the synced tree.

. /scenarios/kernel-client.sh   # make_tree

direct_read_ok() { dd if="$1" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; }

scenario() {
  dev=/dev/nbd0
  wait_secs=$(param fault_wait 240)
  nbd_connect "$dev" netlink
  size=$(blockdev --getsize64 "$dev") || fail "blockdev --getsize64 $dev"
  run /sbin/mke2fs -t ext4 -E nodiscard -F "$dev" "$((size / 1024))k"
  run mount -t ext4 "$dev" /mnt
  make_tree /tmp/src
  (cd /tmp/src && find . -type f | sort | xargs md5sum) >/tmp/sums
  run cp -a /tmp/src/. /mnt/
  run sync
  say "phase=synced"

  mkdir -p /mnt/after || fail "mkdir /mnt/after"
  n=0
  saw=""
  deadline=$(( $(date +%s) + wait_secs ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    n=$((n + 1))
    if ! gen "after-$n" 64 >"/mnt/after/$n.txt" 2>/dev/null || ! sync 2>/dev/null ||
      ! direct_read_ok "$dev"; then
      saw=yes
      break
    fi
    sleep 0.5
  done
  [ -n "$saw" ] || fail "no I/O error within ${wait_secs}s of phase=synced"
  say "phase=saw-io-error after $n writes"
  dmesg | grep -m 3 -i "error" | while IFS= read -r line; do say "dmesg| $line"; done

  wait_for "$wait_secs" "the device to read again" direct_read_ok "$dev"
  say "phase=fault-cleared"
  umount /mnt 2>/dev/null || umount -l /mnt 2>/dev/null || true
  nbd_disconnect "$dev"
  nbd_connect "$dev" netlink
  say "\$ /sbin/e2fsck -fy $dev"
  /sbin/e2fsck -fy "$dev" >/tmp/fsck.out 2>&1
  rc=$?
  while IFS= read -r line; do say "| $line"; done </tmp/fsck.out
  [ "$rc" -le 1 ] || fail "e2fsck -fy exited $rc (uncorrected errors)"
  run /sbin/e2fsck -fn "$dev"
  run mount -t ext4 -o ro "$dev" /mnt
  cd /mnt || fail "cd /mnt"
  run md5sum -c /tmp/sums
  cd / || fail "cd /"
  run umount /mnt
  nbd_disconnect "$dev"
  say "fault: synced data intact, e2fsck clean"
}
