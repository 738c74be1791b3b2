package chain

import "syscall"

// childAttr is how every child starts.
//
// Setpgid puts it in a process group of its own, so the terminal's Ctrl-C
// (SIGINT to the foreground group) reaches only the launcher, which then
// stops the components one by one, in reverse start order.
//
// Pdeathsig makes the kernel SIGKILL it when the launcher goes away without
// stopping it (kill -9, a crash): no component outlives its launcher.
// Strictly the signal comes when the OS thread that started the child exits;
// the Go runtime ends threads only for goroutines that exit while locked to
// one (runtime.LockOSThread), which nothing on the launcher's start path
// does, so in practice that is when the launcher process exits.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
