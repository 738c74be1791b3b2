package chain

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// Port offsets from the base port. Every server has a gRPC listener and a
// plain-HTTP ops listener (/metrics, /healthz, /readyz). Region i (from 0)
// has KMS servers kms-1 and kms-2 on kmsOffset+2i and kmsOffset+2i+1, their
// ops listeners metricsOffset higher and their Vault-transit HTTPS
// listeners transitOffset higher.
const (
	distributorOffset        = 1  // distributor-1..3: base+1..3
	distributorMetricsOffset = 6  // their ops listeners: base+6..8
	rootAPIOffset            = 11 // rootkms-1..3 API: base+11..13
	rootMetricsOffset        = 16 // their ops listeners: base+16..18
	rootRaftOffset           = 21 // rootkms-1..3 Raft: base+21..23
	kmsOffset                = 31 // KMS servers: base+31..50 (10 regions)
	metricsOffset            = 51 // KMS ops listeners: base+51..70
	transitOffset            = 71 // KMS Vault-transit listeners: base+71..90
)

// Fixed sizes of the chain.
const (
	numDistributors = 3
	numRootKMS      = 3
	kmsPerRegion    = 2
	numSafes        = 3
	threshold       = 2
)

// lastOffset is the highest offset a chain with n regions uses.
func lastOffset(n int) int { return transitOffset + kmsPerRegion*n - 1 }

// Port is one port of the chain and what listens on it.
type Port struct {
	// Port is the TCP port on 127.0.0.1.
	Port int
	// Component names the process, e.g. "rootkms-2" or "us-east/kms-1".
	Component string
	// Purpose says which of its listeners it is: "gRPC", "Raft",
	// "metrics" (the ops listener) or "transit".
	Purpose string
}

// Addr is the port's 127.0.0.1 address.
func (p Port) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p.Port)) }

// ports are the addresses of every listener of a chain.
type ports struct {
	distributors, distributorMetrics []string   // distributor-1..3
	rootAPI, rootRaft, rootMetrics   []string   // rootkms-1..3
	kms, metrics, transit            [][]string // per region, kms-1..2
	all                              []Port
	basePort, lastPort               int
}

// PortPlan lists every port a chain with base port base and these regions
// listens on, in start order: the distributors (base+1..3) and their ops
// listeners (base+6..8), the root KMS voters' gRPC API (base+11..13), ops
// listeners (base+16..18) and Raft transport (base+21..23), and per region i
// (from 0) two KMS servers (base+31+2i, base+32+2i) with their ops listeners
// (base+51+2i, base+52+2i) and Vault-transit listeners (base+71+2i,
// base+72+2i).
func PortPlan(base int, regions []string) []Port {
	return planPorts(base, regions).all
}

func planPorts(base int, regions []string) ports {
	p := ports{basePort: base, lastPort: base + lastOffset(len(regions))}
	add := func(offset int, component, purpose string) string {
		port := Port{Port: base + offset, Component: component, Purpose: purpose}
		p.all = append(p.all, port)
		return port.Addr()
	}
	for i := range numDistributors {
		p.distributors = append(p.distributors, add(distributorOffset+i, distributorName(i+1), "gRPC"))
		p.distributorMetrics = append(p.distributorMetrics, add(distributorMetricsOffset+i, distributorName(i+1), "metrics"))
	}
	for i := range numRootKMS {
		p.rootAPI = append(p.rootAPI, add(rootAPIOffset+i, rootKMSName(i+1), "gRPC"))
		p.rootMetrics = append(p.rootMetrics, add(rootMetricsOffset+i, rootKMSName(i+1), "metrics"))
		p.rootRaft = append(p.rootRaft, add(rootRaftOffset+i, rootKMSName(i+1), "Raft"))
	}
	for ri, r := range regions {
		var api, met, tr []string
		for j := range kmsPerRegion {
			name := kmsName(r, j+1)
			api = append(api, add(kmsOffset+kmsPerRegion*ri+j, name, "gRPC"))
			met = append(met, add(metricsOffset+kmsPerRegion*ri+j, name, "metrics"))
			tr = append(tr, add(transitOffset+kmsPerRegion*ri+j, name, "transit"))
		}
		p.kms = append(p.kms, api)
		p.metrics = append(p.metrics, met)
		p.transit = append(p.transit, tr)
	}
	return p
}

func distributorName(i int) string        { return fmt.Sprintf("distributor-%d", i) }
func rootKMSName(i int) string            { return fmt.Sprintf("rootkms-%d", i) }
func kmsName(region string, i int) string { return fmt.Sprintf("%s/kms-%d", region, i) }

// PortsTakenError reports ports of the plan that cannot be listened on.
type PortsTakenError struct {
	// Taken are the ports that could not be listened on.
	Taken []TakenPort
	// Base is the base port of the plan.
	Base int
	// Hint says how to get going: set by the launcher once it has looked
	// (portsHint: the chain of the state dir already running, or a base
	// port whose every port it found free). Without it, Error gives a
	// generic hint and no port.
	Hint string
}

// TakenPort is a port of the plan that could not be listened on, and why.
type TakenPort struct {
	Port
	// Err is the listen error (EADDRINUSE when another process listens).
	Err error
}

// String names the port, its component and, unless another process
// listens there, why it could not be listened on.
func (t TakenPort) String() string {
	s := fmt.Sprintf("port %d (%s %s)", t.Port.Port, t.Component, t.Purpose)
	if !errors.Is(t.Err, syscall.EADDRINUSE) {
		s += fmt.Sprintf(": %v", t.Err)
	}
	return s
}

// Error names every taken port and says how to get going.
func (e *PortsTakenError) Error() string {
	var b strings.Builder
	if len(e.Taken) == 1 {
		fmt.Fprintf(&b, "chain: %s on 127.0.0.1 is taken", e.Taken[0])
	} else {
		fmt.Fprintf(&b, "chain: %d ports on 127.0.0.1 are taken:", len(e.Taken))
		for _, t := range e.Taken {
			fmt.Fprintf(&b, "\n  %s", t)
		}
		b.WriteString("\n")
	}
	hint := e.Hint
	if hint == "" {
		hint = "is another `make up` or `cairn up` running? Stop it (Ctrl-C in its terminal), " +
			"or start a separate chain on free ports: --base-port BASE --state-dir <another dir>"
	}
	if len(e.Taken) == 1 {
		b.WriteString("; ")
	}
	b.WriteString(hint)
	return b.String()
}

// checkPorts listens on every port of plan on 127.0.0.1, all at once, and
// closes them again. It returns a *PortsTakenError naming every port that
// could not be listened on.
func checkPorts(plan []Port) error {
	var (
		held  []net.Listener
		taken []TakenPort
	)
	for _, p := range plan {
		l, err := net.Listen("tcp", p.Addr())
		if err != nil {
			taken = append(taken, TakenPort{Port: p, Err: err})
			continue
		}
		held = append(held, l)
	}
	for _, l := range held {
		l.Close()
	}
	if len(taken) > 0 {
		return &PortsTakenError{Taken: taken, Base: plan[0].Port - distributorOffset}
	}
	return nil
}

// EphemeralPorts is the kernel's range of ports for outgoing connections and
// listeners on port 0 (Linux's default where it cannot be read). A chain's
// ports should lie outside it: a port the kernel hands to an outgoing
// connection could be taken just when a component restarts.
func EphemeralPorts() (lo, hi int) {
	lo, hi = 32768, 60999 // Linux's default
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			l, err1 := strconv.Atoi(f[0])
			h, err2 := strconv.Atoi(f[1])
			if err1 == nil && err2 == nil && l < h {
				lo, hi = l, h
			}
		}
	}
	return lo, hi
}
