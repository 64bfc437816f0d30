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
    mov %rsi, %rdi                 /* zero page */
    xor %esi, %esi                 /* no PVH start_info */
    call conformance_main
1:  cli
    hlt
    jmp 1b

/* PVH entry (XEN_ELFNOTE_PHYS32_ENTRY, used when the ELF is booted): 32-bit
 * protected mode, paging off, EBX = hvm_start_info. Build identity page
 * tables for the first 4 GiB (2 MiB pages), enter long mode, and call
 * conformance_main(0, start_info). */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                        /* name size: "Xen\0" */
    .long 4                        /* descriptor size */
    .long 18                       /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4

    .section .text.pvh, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi                 /* start_info, kept for conformance_main */
    mov $pvh_pdpt, %eax
    or $3, %eax
    mov %eax, pvh_pml4
    movl $0, pvh_pml4 + 4
    mov $pvh_pd, %eax
    or $3, %eax
    xor %ecx, %ecx
1:  mov %eax, pvh_pdpt(,%ecx,8)
    movl $0, pvh_pdpt + 4(,%ecx,8)
    add $4096, %eax
    inc %ecx
    cmp $4, %ecx
    jb 1b
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax                 /* present, writable, 2 MiB */
    mov %eax, pvh_pd(,%ecx,8)
    mov %ecx, %edx
    shr $11, %edx
    mov %edx, pvh_pd + 4(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                 /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    lgdt pvh_gdt_descriptor
    mov %cr0, %eax
    or $0x80000001, %eax           /* paging + protection: long mode active */
    mov %eax, %cr0
    ljmp $0x08, $pvh_long
    .code64
pvh_long:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    lea stack_top(%rip), %rsp
    xor %edi, %edi                 /* no zero page; RSI = start_info */
    call conformance_main
3:  cli
    hlt
    jmp 3b

    .section .rodata.pvh, "a"
    .balign 8
pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff       /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff       /* 0x10: data */
pvh_gdt_descriptor:
    .word 23
    .long pvh_gdt

    .section .bss.pvh, "aw", @nobits
    .balign 4096
pvh_pml4:
    .space 4096
pvh_pdpt:
    .space 4096
pvh_pd:
    .space 4 * 4096

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
