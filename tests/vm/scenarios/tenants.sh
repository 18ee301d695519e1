# Scenario tenants: two tenants of one server at once, each over TLS with its own client
# certificate, so the server's client rules give each connection its own key.
#
# The host attaches the certificates as a tar on /dev/vda (ca-cert.pem, alice-cert.pem,
# alice-key.pem, bob-cert.pem, bob-key.pem). nbdtest.export_a / export_b name the two exports.
# 1. bob's certificate may not open alice's export: nbd-client must fail;
# 2. /dev/nbd0 = alice on export_a, /dev/nbd1 = bob on export_b, both attached at once
#    (nbd-client -b 4096 over TLS, -H localhost: the server certificate's name);
# 3. alice: ext4 with kernel-client.sh's file tree, mounted while bob writes the 4 MiB pattern
#    (O_DIRECT) at the start of his device; sync;
# 4. detach both, attach both again, e2fsck -fn and every file's md5 on alice's, the pattern on
#    bob's; detach. The host then reads both through the server with each tenant's certificate
#    and searches the backing files for plaintext.

. /scenarios/kernel-client.sh   # make_tree, check_pattern, PATTERN_TAG, PATTERN_RECORDS

CERTS=/tmp/certs

tls_attach() {  # tls_attach DEV EXPORT WHO
  wait_for 30 "$1 to be free" nbd_detached "$1"
  run /sbin/nbd-client "$NBD_HOST" "$NBD_PORT" "$1" -N "$2" -t 60 -b 4096 \
    -cacertfile "$CERTS/ca-cert.pem" -certfile "$CERTS/$3-cert.pem" -keyfile "$CERTS/$3-key.pem" -tlshostname localhost
  wait_for 30 "$1 to get a size" nbd_attached "$1"
  say "attached $1: $2 as $3"
}

scenario() {
  export_a=$(param export_a tenant-a)
  export_b=$(param export_b tenant-b)
  wait_for 30 "the certificate disk" test -b /dev/vda
  mkdir -p "$CERTS"
  run tar -xf /dev/vda -C "$CERTS"

  say "\$ nbd-client (bob) -N $export_a: must be refused"
  if /sbin/nbd-client "$NBD_HOST" "$NBD_PORT" /dev/nbd2 -N "$export_a" -t 60 -b 4096 \
    -cacertfile "$CERTS/ca-cert.pem" -certfile "$CERTS/bob-cert.pem" -keyfile "$CERTS/bob-key.pem" -tlshostname localhost \
    >/tmp/refused.out 2>&1; then
    fail "bob's certificate opened $export_a"
  fi
  while IFS= read -r line; do say "| $line"; done </tmp/refused.out
  say "bob refused on $export_a"

  tls_attach /dev/nbd0 "$export_a" alice
  tls_attach /dev/nbd1 "$export_b" bob
  say "size-a=$(blockdev --getsize64 /dev/nbd0) size-b=$(blockdev --getsize64 /dev/nbd1)"

  run /sbin/mke2fs -t ext4 -E nodiscard -F /dev/nbd0
  run mount -t ext4 /dev/nbd0 /mnt
  make_tree /tmp/src
  (cd /tmp/src && find . -type f | sort | xargs md5sum) >/tmp/sums
  run cp -a /tmp/src/. /mnt/
  gen "$PATTERN_TAG" "$PATTERN_RECORDS" >/tmp/pattern   # bob writes while alice's fs is mounted
  PATTERN_MD5=$(md5 /tmp/pattern)
  say "pattern-md5=$PATTERN_MD5"
  run dd if=/tmp/pattern of=/dev/nbd1 bs=131072 oflag=direct conv=notrunc,fsync
  run sync
  while read -r sum path; do say "file-md5 $sum ${path#./}"; done </tmp/sums
  check_pattern /dev/nbd1 0 "by bob while alice's fs is mounted"
  run umount /mnt

  nbd_disconnect /dev/nbd0
  nbd_disconnect /dev/nbd1
  tls_attach /dev/nbd0 "$export_a" alice
  tls_attach /dev/nbd1 "$export_b" bob
  run /sbin/e2fsck -fn /dev/nbd0
  run mount -t ext4 -o ro /dev/nbd0 /mnt
  cd /mnt || fail "cd /mnt"
  run md5sum -c /tmp/sums
  cd / || fail "cd /"
  run umount /mnt
  check_pattern /dev/nbd1 0 "after reattaching"
  nbd_disconnect /dev/nbd0
  nbd_disconnect /dev/nbd1
  say "tenants: both tenants' data intact"
}
