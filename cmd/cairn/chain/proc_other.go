//go:build unix && !linux

package chain

import "syscall"

// childAttr is how every child starts: in its own process group, so the
// terminal's Ctrl-C reaches only the launcher, which stops the components in
// order. Outside Linux there is no Pdeathsig: a launcher killed with -9
// leaves its components running (their PIDs are in chain.json).
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
