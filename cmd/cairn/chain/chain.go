// Package chain runs a whole Cairn chain on one machine, as real processes
// of the real binaries: the library behind `cairn up` (and `make up`).
//
// A first run, in an empty state dir, makes everything: a dev CA with every
// identity, three safes (SoftHSM2 tokens when SoftHSM2 is installed, else
// insecure file safes with random passphrases in 0600 files), three
// distributors in a peer mesh, a 2-of-3 genesis into distributor-1 (the other
// two unseal from it), a 3-voter root KMS, regionctl's signing key, the
// regions, the demo team's keysets (see demoTeamFile for their ACLs), a
// signed bundle per region, and two KMS servers per region, to which it
// rolls the bundles out as an SRE rolls out a change: `regionctl rollout
// start`, canary first, with a short bake (see rolloutBundles). It then
// records what it made in setup.json.
//
// A re-run on that state dir reuses all of it: the certificates are kept,
// the distributors start sealed and officers 1 and 2 unseal distributor-1 in
// a dev unseal ceremony from their safes (the others unseal from it), the
// root KMS voters restart from their Raft data, and the KMS servers from
// their persisted bundles. Nothing is generated again.
//
// Either way, Up then optionally runs the demo (an envelope-encryption round
// trip through the Tink client, kmsclient), writes chain.json (Info: what
// runs where, read back with Load), and returns a running Chain. Stop stops
// every process it started, in reverse start order. Every process is a child
// of the launcher, in its own process group, killed by the kernel if the
// launcher dies (see childAttr); its stdout and stderr go to
// <state-dir>/logs. Nothing printed or written outside the safes holds key
// material or a passphrase.
package chain

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity"
)

// binaries are the commands a chain runs, looked for in Config.BinDir.
var binaries = []string{"safe", "distributor", "rootkms", "kms", "regionctl"}

// Chain is a running chain started by Up.
type Chain struct {
	s      settings
	layout layout
	out    io.Writer
	log    *slog.Logger
	hsm    *softHSM
	ports  ports

	// The components, described before any starts.
	dists, roots []*proc
	kms          [][]*proc // per region of s.Regions

	observer  *identity.Source // regionctl's identity, for status polls
	genesisID string

	mu    sync.Mutex
	procs []*proc // started, in start order
	info  Info
	wg    sync.WaitGroup // one reap goroutine per started process

	// deaths are the components that exited without being asked to, in
	// order (on mu); Wait has returned the first reported of them, and
	// died wakes it (capacity 1, sends never block).
	deaths   []error
	reported int
	died     chan struct{}

	// ctl serves `cairn up restart` (restart.go, control.go).
	ctl control

	stopOnce    sync.Once
	stopErr     error
	termTimeout time.Duration // grace after SIGTERM; termTimeout but in tests
}

// Up starts the chain that cfg describes and returns once it is ready (and
// the demo, if asked for, succeeded). It prints its progress to cfg.Out. On
// failure, or when ctx ends first, it stops everything it started and
// returns the error. The caller must Stop a returned Chain.
func Up(ctx context.Context, cfg Config) (*Chain, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	stateDir, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("chain: state dir: %w", err)
	}
	binDir, err := filepath.Abs(cfg.BinDir)
	if err != nil {
		return nil, fmt.Errorf("chain: bin dir: %w", err)
	}
	rec, err := inspectState(stateDir)
	if err != nil {
		return nil, err
	}
	hsm := findSoftHSM()
	s, err := resolve(cfg, rec, stateDir, binDir, hsm != nil)
	if err != nil {
		return nil, err
	}
	c := newChain(cfg, s, hsm)
	if s.Rerun {
		fmt.Fprintf(c.out, "cairn up: re-run of the chain in %s (made %s: %s, regions %s, ports %d-%d)\n",
			c.display(stateDir), rec.CreatedAt.Local().Format(time.DateTime), safesLabel(s.Safes), strings.Join(s.Regions, ", "), c.ports.basePort+1, c.ports.lastPort)
	} else {
		fmt.Fprintf(c.out, "cairn up: new chain in %s (%s, regions %s, ports %d-%d)\n",
			c.display(stateDir), safesLabel(s.Safes), strings.Join(s.Regions, ", "), c.ports.basePort+1, c.ports.lastPort)
	}
	var steps []step
	if s.Rerun {
		steps = c.rerunSteps(ctx)
	} else {
		steps = c.firstRunSteps(ctx)
	}
	if err := runSteps(c.out, steps); err != nil {
		if ctx.Err() != nil && !errors.Is(err, errInterrupted) {
			err = fmt.Errorf("%w: %w", errInterrupted, err)
		}
		if started := c.started(); len(started) > 0 {
			fmt.Fprintf(c.out, "stopping the %d processes it started:\n", len(started))
			// How each ended is in its line; only one that may still run
			// adds to the error.
			if serr := c.Stop(context.Background()); errors.Is(serr, ErrNotStopped) {
				err = errors.Join(err, serr)
			}
		}
		if !s.Rerun {
			if _, ierr := inspectState(stateDir); errors.Is(ierr, ErrUnfinished) {
				err = fmt.Errorf("%w\nchain: %s now holds an unfinished first run (its logs are in %s); remove it (rm -rf %s) before the next try",
					err, c.display(stateDir), c.display(c.layout.logs()), c.display(stateDir))
			}
		}
		return nil, err
	}
	c.printSummary()
	if err := c.startControl(); err != nil {
		fmt.Fprintf(c.out, "cairn up: %v; `cairn up restart` cannot reach this chain\n", err)
	}
	return c, nil
}

// newChain describes every component of the chain; none is started.
func newChain(cfg Config, s settings, hsm *softHSM) *Chain {
	c := &Chain{s: s, layout: layout{s.StateDir}, out: cfg.Out, log: cfg.Logger, hsm: hsm,
		ports: planPorts(s.BasePort, s.Regions), died: make(chan struct{}, 1), termTimeout: termTimeout}
	if c.out == nil {
		c.out = io.Discard
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	c.describe()
	return c
}

// Info returns what runs where: the content of chain.json.
func (c *Chain) Info() Info {
	c.mu.Lock()
	defer c.mu.Unlock()
	info := c.info
	info.Components = append([]Component(nil), c.info.Components...)
	info.Regions = append([]Region(nil), c.info.Regions...)
	return info
}

// Wait blocks until ctx ends, and returns nil, or until a component exits
// without being asked to, and returns an error naming it and its log. The
// rest of the chain keeps running (kill a KMS server and its region's
// clients fail over to the other); call Wait again for the next death.
// Either way the chain still has to be stopped with Stop.
func (c *Chain) Wait(ctx context.Context) error {
	for {
		c.mu.Lock()
		if c.reported < len(c.deaths) {
			err := c.deaths[c.reported]
			c.reported++
			c.mu.Unlock()
			return err
		}
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-c.died:
		}
	}
}

// Running returns how many of the chain's processes are running.
func (c *Chain) Running() int {
	n := 0
	for _, p := range c.started() {
		select {
		case <-p.done:
		default:
			n++
		}
	}
	return n
}

// Stop stops every process the chain started, in reverse start order: each
// gets SIGTERM and 10 seconds to exit, then SIGKILL (only ever by its own
// PID). It prints one line per process and returns what went wrong: a
// process that had to be killed or exited with an error, and (wrapping
// ErrNotStopped) one that may still run. When ctx ends, the processes still
// running are killed at once. Stop may be called more than once; later calls
// return the first call's result.
func (c *Chain) Stop(ctx context.Context) error {
	c.stopOnce.Do(func() {
		c.stopControl() // no restart runs from here on
		procs := c.started()
		var errs []error
		for i := len(procs) - 1; i >= 0; i-- {
			line, err := procs[i].stop(ctx, c.termTimeout)
			if line != "" {
				fmt.Fprintf(c.out, "  %s\n", line)
			}
			if err != nil {
				errs = append(errs, err)
			}
		}
		c.wg.Wait()
		c.mu.Lock()
		written := c.info.Version != 0
		if written {
			c.info.StoppedAt = time.Now().UTC()
		}
		info := c.info
		c.mu.Unlock()
		if written {
			if err := info.write(); err != nil {
				errs = append(errs, err)
			}
		}
		c.stopErr = errors.Join(errs...)
	})
	return c.stopErr
}

// started returns the processes started so far, in start order.
func (c *Chain) started() []*proc {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*proc(nil), c.procs...)
}

// display returns path relative to the working directory when it is under
// it (shorter to read and to paste), else path.
func (c *Chain) display(path string) string {
	wd, err := os.Getwd()
	if err != nil {
		return path
	}
	rel, err := filepath.Rel(wd, path)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return path
	}
	return rel
}

// printSummary prints the table of components and the commands to try.
func (c *Chain) printSummary() {
	info := c.Info()
	fmt.Fprintln(c.out)
	tw := tabwriter.NewWriter(c.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "component\taddress\tpid\tlog")
	for _, p := range info.Components {
		addr := p.Address
		if p.RaftAddress != "" {
			addr += " (raft " + strings.TrimPrefix(p.RaftAddress, "127.0.0.1:") + ")"
		}
		if p.MetricsAddress != "" {
			addr += " (ops " + strings.TrimPrefix(p.MetricsAddress, "127.0.0.1:") + ")"
		}
		if p.TransitAddress != "" {
			addr += " (transit " + strings.TrimPrefix(p.TransitAddress, "127.0.0.1:") + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", p.Name, addr, p.PID, c.display(p.Log))
	}
	tw.Flush()
	fmt.Fprintf(c.out, "\nchain.json: %s   trust domain: %s   safes: %s\n", c.display(c.layout.chainJSON()), info.TrustDomain, safesLabel(c.s.Safes))
	fmt.Fprintln(c.out, "\nnext commands to try:")
	for _, cmd := range c.nextCommands() {
		fmt.Fprintf(c.out, "  %s\n", cmd)
	}
	fmt.Fprintln(c.out)
}

// nextCommands are the commands the summary suggests.
func (c *Chain) nextCommands() []string {
	bin := func(name string) string {
		p := c.display(filepath.Join(c.s.BinDir, name))
		if !strings.ContainsRune(p, filepath.Separator) {
			p = "." + string(filepath.Separator) + p // not looked up in PATH
		}
		return p
	}
	// Identity flags with the certs dir as displayed.
	idFlags := func(name string) string {
		f := c.idFlags(name)
		f[3] = c.display(f[3])
		return strings.Join(f, " ")
	}
	// cairn kms and the blobstore example read chain.json from --chain
	// (default .state/up).
	chainFlag := ""
	if abs, err := filepath.Abs(DefaultStateDir); err != nil || abs != c.s.StateDir {
		chainFlag = " --chain " + c.display(c.s.StateDir)
	}
	r0 := c.s.Regions[0]
	notes := KeyURI(r0, notesKeyset)
	blobs := ""
	if r0 != "us-east" { // the blobstore's default key is cairn-kms://us-east/demo/blobs
		blobs = " --key-uri " + KeyURI(r0, blobsKeyset)
	}
	id := idFlags(regionctlName)
	rcCert, rcKey := devca.LeafPaths(c.layout.certs(), identity.MustParse(c.spiffeID(regionctlName)).SPIFFEID())
	officer := idFlags(officerName(1))
	return []string{
		bin("cairn") + " kms status" + chainFlag,
		bin("cairn") + " kms encrypt" + chainFlag + " --key " + notes + " 'hello, cairn' | " + bin("cairn") + " kms decrypt" + chainFlag + " --key " + notes,
		"go run ./examples/blobstore" + chainFlag + blobs + " put notes.txt README.md && go run ./examples/blobstore" + chainFlag + blobs + " get notes.txt | head -3",
		bin("regionctl") + " rollout status --config " + c.display(c.layout.regionctlConfig()) + " " + rolloutID,
		bin("regionctl") + " bundle inspect --bundle " + c.display(c.layout.bundle(r0, 1)) + " --signing-pub " + c.display(c.layout.signingPub()),
		bin("regionctl") + " region create --rootkms " + strings.Join(c.ports.rootAPI, ",") + " --region ap-south " + id,
		bin("safe") + " ceremony status --distributor " + c.ports.distributors[0] + " " + officer,
		"curl -s http://" + c.ports.metrics[0][0] + "/metrics | grep cairn_   # every server: /metrics /healthz /readyz on its ops port",
		"make tools && bin/tools/grpcurl -cacert " + c.display(filepath.Join(c.layout.certs(), "ca.pem")) + " -cert " + c.display(rcCert) + " -key " + c.display(rcKey) + " " + c.ports.rootAPI[0] + " list",
		fmt.Sprintf("kill -9 %d   # %s: clients fail over to %s; cairn up reports it and keeps the rest running", c.kms[0][0].PID, c.kms[0][0].Name, c.kms[0][1].Name),
		bin("cairn") + " up restart" + strings.Replace(chainFlag, "--chain", "--state-dir", 1) + " " + c.kms[0][0].Name + "   # starts it again (any component: distributor-1, rootkms-2, ...)",
	}
}
