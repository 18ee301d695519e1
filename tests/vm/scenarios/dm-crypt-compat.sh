# Scenario dm-crypt-compat: the kernel's dm-crypt and nbdcrypt's crypt target, same table lines,
# same bytes on the device below.
#
# The host serves the raw backing file as nbdtest.export and, beside it, one nbdcrypt crypt
# device per table line over regions of that file; before the boot it writes pattern
# "hostA-K" (gen, nbdtest.records records) at byte nbdtest.a_off of crypt device K.
# Parameters: nbdtest.tables=N and nbdtest.tableK=<the table line, ',' for ' ', '@' for the
# device> for K = 1..N; nbdtest.records, nbdtest.a_off, nbdtest.b_off (bytes, 4 KiB aligned).
# For each table: dmsetup create over /dev/nbd0, log `dmsetup table` (table-K=...), read
# a_off through /dev/mapper/cryptK and compare with gen hostA-K, write gen guestB-K at b_off
# (O_DIRECT, fsync), dmsetup remove. Then detach. The host reads guestB-K back through its
# own crypt device K.

scenario() {
  dev=/dev/nbd0
  tables=$(param tables 0)
  records=$(param records 1024)
  a_off=$(param a_off 65536)
  b_off=$(param b_off 4194304)
  [ "$tables" -gt 0 ] || fail "no tables given (nbdtest.tables)"

  nbd_connect "$dev" netlink
  k=1
  while [ "$k" -le "$tables" ]; do
    check_table "$k" "$(param "table$k" | tr ',' ' ' | sed "s|@|$dev|")"
    k=$((k + 1))
  done
  nbd_disconnect "$dev"
  say "dm-crypt-compat: $tables tables checked"
}

check_table() {  # check_table K LINE
  name="crypt$1"
  run /sbin/dmsetup create "$name" --table "$2"
  say "table-$1=$(/sbin/dmsetup table "$name")"

  gen "hostA-$1" "$records" >/tmp/want
  rm -f /tmp/got
  run dd if="/dev/mapper/$name" of=/tmp/got bs=4096 skip="$a_off" count=$((records / 8)) \
    iflag=skip_bytes,direct
  want=$(md5 /tmp/want)
  got=$(md5 /tmp/got)
  [ "$got" = "$want" ] || fail "table $1: dm-crypt read md5 $got where the host wrote $want"
  say "table $1: dm-crypt decrypts what nbdcrypt wrote"

  gen "guestB-$1" "$records" >/tmp/pattern
  run dd if=/tmp/pattern of="/dev/mapper/$name" bs=4096 seek="$b_off" \
    oflag=seek_bytes,direct conv=notrunc,fsync
  run /sbin/dmsetup remove "$name"
  say "table $1: guestB written"
}
