/* Entry and AP trampoline of the conformance guest.
 *
 * The protected-mode image is linked at 1 MiB. A bzImage's 64-bit entry is
 * 0x200 bytes into it (boot protocol: startup_64), entered in long mode with
 * the loader's identity page tables, interrupts off and RSI = zero page. */
    .section .head.text, "ax"
    .code32
    .globl _head
_head:
    /* 32-bit entry (startup_32): unsupported here; ud2 makes a wrong entry
     * a triple fault the host reports, not a silent hang. */
    .fill 0x100, 2, 0x0b0f

    .code64
    .globl startup_64
startup_64:
    cli
    cld
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi
    call conformance_main
1:  cli
    hlt
    jmp 1b

/* Application-processor trampoline, copied to AP_BASE (a page below 1 MiB)
 * and started by INIT-SIPI-SIPI with vector AP_BASE >> 12: real mode ->
 * protected mode -> long mode on the BSP's page tables, then it counts
 * itself in ap_count and halts. */
    .set AP_BASE, 0x10000
    .section .rodata.trampoline, "a"
    .code16
    .globl ap_trampoline_start, ap_trampoline_end, ap_trampoline_cr3, ap_trampoline_count
ap_trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_gdt_descriptor - ap_trampoline_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(AP_BASE + ap_protected - ap_trampoline_start)
    .code32
ap_protected:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax                 /* PAE */
    mov %eax, %cr4
    mov (AP_BASE + ap_trampoline_cr3 - ap_trampoline_start), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax           /* paging: long mode active */
    mov %eax, %cr0
    ljmpl $0x18, $(AP_BASE + ap_long - ap_trampoline_start)
    .code64
ap_long:
    lock incl (AP_BASE + ap_trampoline_count - ap_trampoline_start)
2:  cli
    hlt
    jmp 2b
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff       /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff       /* 0x10: data */
    .quad 0x00af9a000000ffff       /* 0x18: 64-bit code */
ap_gdt_descriptor:
    .word 31
    .long AP_BASE + ap_gdt - ap_trampoline_start
    .balign 4
ap_trampoline_cr3:
    .long 0
ap_trampoline_count:
    .long 0
ap_trampoline_end:

    .section .bss
    .balign 16
    .space 16384
stack_top:
    .section .note.GNU-stack, "", @progbits
