#!/bin/busybox sh
# /init of the hostbed's Linux guest (TCG): Debian's kernel + this busybox initramfs, built
# by `cargo xtask hostbed start` (xtask/src/linuxguest.rs) into /run/defib-hostbed/linux/.
# tests/src/guests.rs (LinuxGuest) runs it. Adapted from ../shared/testbed/hostbed recipe 1.
#
# - "HB-LINUX-UP ..." on the serial console once the virtio disk is there;
# - every second one 4 KiB write to the virtio disk (blocks 1..255, O_DIRECT), then
#   "HB-IO <n>" on the console, as the boot-sector guest does;
# - every second it reads the disk's first sector, the control line the harness writes
#   from the host: "hb_panic=now" makes it rewrite the line to "hb_panic=done" (so that
#   the next boot does not panic again: a one-shot switch, no race with a restart), print
#   "HB-PANIC-NOW" and panic the kernel (sysrq 'c'); pvpanic tells qemu.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# virtio-blk for the disk, pvpanic-mmio for the ISA pvpanic device (libvirt's
# <panic model='isa'/>): the kernel tells qemu it panicked, libvirt acts on <on_crash>.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk pvpanic pvpanic-mmio; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done

control() {
  dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -c 'a-z0-9_=' ' ' | tr -s ' '
}

echo "HB-LINUX-UP uptime=$(cut -d' ' -f1 /proc/uptime) vda=$([ -b /dev/vda ] && echo yes || echo no) pvpanic=$([ -d /sys/bus/platform/drivers/pvpanic-mmio ] && echo yes || echo no) control=$(control)"

n=0
while true; do
  n=$((n+1))
  if echo "hb-io $n" | dd of=/dev/vda bs=4096 seek=$((1 + n % 255)) conv=sync,notrunc oflag=direct 2>/dev/null; then
    echo "HB-IO $n"
  else
    echo "HB-IOERR $n"
  fi
  case " $(control) " in
    *" hb_panic=now "*)
      printf 'hb_panic=done\n' | dd of=/dev/vda bs=512 count=1 conv=sync,notrunc oflag=direct 2>/dev/null
      echo "HB-PANIC-NOW control=$(control)"
      echo c > /proc/sysrq-trigger
      ;;
  esac
  sleep 1
done
