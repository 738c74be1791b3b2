package rootkms_test

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms"
)

// switchProxy forwards TCP connections to target while on; while off it
// closes every connection at once, as a distributor that is down.
type switchProxy struct {
	lis    net.Listener
	on     atomic.Bool
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
	target string
}

func newSwitchProxy(t *testing.T, target string) *switchProxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &switchProxy{lis: lis, target: target}
	p.on.Store(true)
	p.wg.Go(func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			if !p.on.Load() {
				c.Close()
				continue
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			p.wg.Go(func() { _, _ = io.Copy(up, c); up.Close() })
			p.wg.Go(func() { _, _ = io.Copy(c, up); c.Close() })
		}
	})
	t.Cleanup(func() {
		lis.Close()
		p.off()
		p.wg.Wait()
	})
	return p
}

// off refuses new connections and cuts the open ones.
func (p *switchProxy) off() {
	p.on.Store(false)
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// TestKeylessLeaderHandsOff: a voter without the root key (its key dropped
// while its distributor is down) that becomes leader hands leadership to a
// voter that holds the key within a few seconds, and writes go through
// again; it does not keep a cluster whose other voters hold the key
// refusing every write until a ceremony.
func TestKeylessLeaderHandsOff(t *testing.T) {
	c := newChain(t)
	proxy := newSwitchProxy(t, c.distAddr)
	c.configure = func(id string, cfg *rootkms.Config) {
		if id == "rootkms-3" {
			cfg.Distributors = []string{proxy.lis.Addr().String()}
		}
	}
	rs := c.cluster()
	r3 := rs[2]
	proxy.off()
	officer := c.rawClient(t, "spiffe://cairn.test/officer/global/officer-1", r3.api)
	if resp, err := officer.DropRootKey(bg(t), &rootkmsv1.DropRootKeyRequest{Reason: "test: a voter without the key"}); err != nil || !resp.GetHadRootKey() {
		t.Fatalf("DropRootKey(rootkms-3) = %v, %v", resp, err)
	}
	if r3.srv.HasRootKey() {
		t.Fatal("rootkms-3 holds the root key after DropRootKey with its distributor down")
	}

	// Make the keyless voter leader, as an election it wins would.
	var leader *rootkms.Server
	for _, r := range rs[:3] {
		if r.srv.Raft().State() == raft.Leader {
			leader = r.srv
		}
	}
	if leader == nil {
		t.Fatal("no leader among the voters")
	}
	if leader != r3.srv {
		f := leader.Raft().GetConfiguration()
		if err := f.Error(); err != nil {
			t.Fatal(err)
		}
		var addr raft.ServerAddress
		for _, s := range f.Configuration().Servers {
			if s.ID == "rootkms-3" {
				addr = s.Address
			}
		}
		if err := leader.Raft().LeadershipTransferToServer("rootkms-3", addr).Error(); err != nil {
			t.Fatalf("moving leadership to rootkms-3: %v", err)
		}
	}
	waitFor := func(what string, d time.Duration, ok func() bool) time.Duration {
		t.Helper()
		start := time.Now()
		for !ok() {
			if time.Since(start) > d {
				t.Fatalf("%s: not after %s", what, d)
			}
			time.Sleep(20 * time.Millisecond)
		}
		return time.Since(start)
	}
	waitFor("rootkms-3 leads", 10*time.Second, func() bool { return r3.srv.Raft().State() == raft.Leader })
	took := waitFor("a voter holding the root key leads instead of rootkms-3", 20*time.Second, func() bool {
		for _, r := range rs[:2] {
			if r.srv.Raft().State() == raft.Leader && r.srv.HasRootKey() {
				return true
			}
		}
		return false
	})
	t.Logf("the keyless leader handed leadership off after %s", took.Round(time.Millisecond))
	cl := c.client(regionctlID, addrs(rs[:3])...)
	createRegion(t, cl, "after-hand-off")
	if r3.srv.HasRootKey() {
		t.Error("rootkms-3 got the root key back with its distributor down")
	}
}
