# The hostbed's KVM guest (tests/src/guests.rs, `cargo xtask hostbed start` builds it with
# as/ld into /run/defib-hostbed/hbguest.bin). Adapted from ../shared/testbed/hostbed.
#
# Real-mode guest. Every ~1 s: int 13h AH=43h write of one sector (LBA 1..63) -> SeaBIOS virtio-blk ->
# qemu block layer; then "HB-IO <n>" on COM1. HLT between BIOS timer ticks (idle vCPU).
# Byte at 0x1f0 (wdt_pets) != 0: arm the ib700 watchdog (timeout index at 0x1f1, 13 = 4 s), pet it for
# wdt_pets ticks, then stop petting so that it fires.
        .intel_syntax noprefix
        .code16
        .globl _start
_start: cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        sti
        mov [drive], dl
        lea si, [msg_boot]
        call puts
        mov al, [wdt_pets]
        test al, al
        jz mainloop
        mov al, [wdt_idx]
        mov dx, 0x443
        out dx, al
mainloop:
        inc word ptr [counter]
        mov ax, [counter]
        mov word ptr [0x8000], ax
        xor dx, dx
        mov bx, 63
        div bx
        inc dx
        mov [dap_lba], dx
        mov si, offset dap
        mov ah, 0x43
        mov al, 0
        mov dl, [drive]
        int 0x13
        jc ioerr
        lea si, [msg_io]
        call puts
        mov ax, [counter]
        call putdec
        mov al, 13
        call putc
        mov al, 10
        call putc
        jmp wdt
ioerr:  lea si, [msg_err]
        call puts
wdt:    mov al, [wdt_pets]
        test al, al
        jz sleep1
        dec byte ptr [wdt_pets]
        jz wdt_stop_msg
        mov al, [wdt_idx]
        mov dx, 0x443
        out dx, al
        jmp sleep1
wdt_stop_msg:
        lea si, [msg_wdt]
        call puts
sleep1: mov bx, [0x46c]
        add bx, 18
1:      hlt
        mov ax, [0x46c]
        sub ax, bx
        js 1b
        jmp mainloop
puts:   lodsb
        test al, al
        jz 2f
        call putc
        jmp puts
2:      ret
putc:   push dx
        push ax
        mov dx, 0x3fd
3:      in al, dx
        test al, 0x20
        jz 3b
        pop ax
        mov dx, 0x3f8
        out dx, al
        pop dx
        ret
putdec: xor cx, cx
        mov bx, 10
4:      xor dx, dx
        div bx
        push dx
        inc cx
        test ax, ax
        jnz 4b
5:      pop ax
        add al, '0'
        call putc
        loop 5b
        ret
msg_boot: .asciz "HB-BOOT-DONE\r\n"
msg_io:   .asciz "HB-IO "
msg_err:  .asciz "HB-IOERR\r\n"
msg_wdt:  .asciz "HB-WDT-STOPPED-PETTING\r\n"
        .balign 4
dap:    .byte 16, 0
        .word 1
        .word 0x8000, 0
dap_lba: .word 1, 0, 0, 0
counter: .word 0
drive:   .byte 0x80
        .org 0x1f0
wdt_pets: .byte 0
wdt_idx:  .byte 13
        .org 0x1fe
        .byte 0x55, 0xaa
