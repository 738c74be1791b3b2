package rollout_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/regionctl/rollout"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the expected output of testdata scripts")

// t0 is the scripts' clock at the start.
var t0 = time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)

// Serials the scripts use: every server serves lastGoodSerial before the
// rollout; every region's new bundle has bundleSerial.
const (
	lastGoodSerial = 99
	bundleSerial   = 100
)

func sum(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func newRef(region string) rollout.BundleRef {
	return rollout.BundleRef{Region: region, Serial: bundleSerial, SHA256: sum("new " + region)}
}

func lastGoodRef(region string) rollout.BundleRef {
	return rollout.BundleRef{Region: region, Serial: lastGoodSerial, SHA256: sum("old " + region)}
}

// TestScripts runs every testdata/*.txt script, in the spirit of
// cockroachdb/datadriven. A script is blocks separated by blank lines; a
// block is a command line, optional input lines, "----", and the expected
// output. Run with -rewrite to regenerate the expected output (then read the
// diff: the goldens are the spec).
//
// Commands (events are stamped with the script's current epoch):
//
//	new [id=R] [regions=a,b] [canary=N] [wave=N] [bake-canary=D] [bake-region=D] [bake-wave=D] [keysets=k:a,b;k2:b] [max-err=F] [max-p99=F]
//	  input: the fleet, one "region: server..." a line; a bundle for every region
//	start | tick | pause | resume | abort | rollback
//	dry-run SERVER...            every server's dry run passes
//	refuse SERVER REASON...      the server's dry run refuses
//	measure [err=F] [p99=D]      the stage's baseline
//	apply SERVER...              each server applied its region's bundle
//	apply-serial SERVER N        the server reports applying serial N
//	apply-fail SERVER REASON...
//	gate [err=F] [p99=D] [notready=s1,s2] [probe=server:keyset:id]...
//	rolled-back SERVER... [serial=N]
//	rollback-fail SERVER REASON...
//	takeover [epoch=N]           a new controller; the script's epoch becomes N
//	epoch N                      stamp later events with epoch N (a stale controller)
//	advance D                    move the clock
//	crash                        store and reload the record; print Actions
//	status                       print Status
//
// After every event the runner checks: Check holds; Next did not modify its
// input; the same event applied to a copy of the record that went through
// JSON (a controller that crashed and reloaded it) gives the same record and
// actions; Actions is the same on the reloaded copy; and the actions never
// ask for a stage other than the record's, nor for a dry run, apply or
// probe while paused, nor for an apply on a stage whose dry runs have not
// all passed.
func TestScripts(t *testing.T) {
	files, err := filepath.Glob("testdata/*.txt")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no testdata/*.txt scripts")
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".txt"), func(t *testing.T) { runScript(t, f) })
	}
}

type block struct {
	line  int
	cmd   string
	input []string
	want  string
}

func parseScript(t *testing.T, path string) (blocks []block, comments map[int][]string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	comments = map[int][]string{}
	for i := 0; i < len(lines); {
		if strings.TrimSpace(lines[i]) == "" {
			i++
			continue
		}
		if strings.HasPrefix(lines[i], "#") {
			comments[len(blocks)] = append(comments[len(blocks)], lines[i])
			i++
			continue
		}
		b := block{line: i + 1, cmd: lines[i]}
		i++
		for i < len(lines) && lines[i] != "----" {
			if strings.TrimSpace(lines[i]) == "" {
				t.Fatalf("%s:%d: block %q has no ---- separator", path, b.line, b.cmd)
			}
			b.input = append(b.input, lines[i])
			i++
		}
		if i == len(lines) {
			t.Fatalf("%s:%d: block %q has no ---- separator", path, b.line, b.cmd)
		}
		i++
		var out []string
		for i < len(lines) && strings.TrimSpace(lines[i]) != "" {
			out = append(out, lines[i])
			i++
		}
		b.want = strings.Join(out, "\n")
		blocks = append(blocks, b)
	}
	return blocks, comments
}

func runScript(t *testing.T, path string) {
	blocks, comments := parseScript(t, path)
	s := &scriptState{t: t, now: t0}
	var rewritten strings.Builder
	for i, b := range blocks {
		got := strings.TrimRight(s.run(b), "\n")
		if strings.Contains(got, "\n\n") {
			t.Fatalf("%s:%d: output of %q has a blank line", path, b.line, b.cmd)
		}
		if *rewrite {
			for _, c := range comments[i] {
				rewritten.WriteString(c + "\n")
			}
			fmt.Fprintf(&rewritten, "%s\n", b.cmd)
			for _, in := range b.input {
				rewritten.WriteString(in + "\n")
			}
			fmt.Fprintf(&rewritten, "----\n%s\n\n", got)
			continue
		}
		if got != b.want {
			t.Errorf("%s:%d: %s\n%s", path, b.line, b.cmd, cmp.Diff(b.want, got))
		}
	}
	if *rewrite {
		for _, c := range comments[len(blocks)] {
			rewritten.WriteString(c + "\n")
		}
		if err := os.WriteFile(path, []byte(strings.TrimRight(rewritten.String(), "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

type scriptState struct {
	t     *testing.T
	now   time.Time
	rec   rollout.Record
	epoch uint64
	ready bool
}

func (s *scriptState) run(b block) string {
	s.t.Helper()
	fields := strings.Fields(b.cmd)
	cmd, args := fields[0], fields[1:]
	kv := map[string]string{}
	var pos []string
	for _, a := range args {
		if k, v, ok := strings.Cut(a, "="); ok {
			kv[k] = v
		} else {
			pos = append(pos, a)
		}
	}
	if cmd == "new" {
		return s.newRollout(kv, b.input)
	}
	if !s.ready && cmd != "advance" {
		s.t.Fatalf("line %d: %s before new", b.line, cmd)
	}
	var evs []rollout.Event
	e := s.epoch
	switch cmd {
	case "start":
		evs = append(evs, rollout.Started{Epoch: e})
	case "tick":
		evs = append(evs, rollout.Tick{Epoch: e})
	case "pause":
		evs = append(evs, rollout.Pause{Epoch: e, By: "bob", Why: "looking at a dashboard"})
	case "resume":
		evs = append(evs, rollout.Resume{Epoch: e, By: "bob"})
	case "abort":
		evs = append(evs, rollout.Abort{Epoch: e, By: "bob", Why: "wrong change"})
	case "rollback":
		evs = append(evs, rollout.RollbackRequested{Epoch: e, By: "bob", Why: "clients report errors"})
	case "dry-run":
		for _, srv := range pos {
			evs = append(evs, rollout.DryRunResult{Epoch: e, Server: srv, OK: true, Serving: lastGoodRef(s.region(srv))})
		}
	case "refuse":
		evs = append(evs, rollout.DryRunResult{Epoch: e, Server: pos[0], Reason: strings.Join(pos[1:], " "), Serving: lastGoodRef(s.region(pos[0]))})
	case "measure":
		evs = append(evs, rollout.Measured{Epoch: e, Stage: s.rec.Stage, Metrics: s.metrics(kv)})
	case "apply":
		for _, srv := range pos {
			evs = append(evs, rollout.Applied{Epoch: e, Server: srv, Serial: bundleSerial, Previous: lastGoodRef(s.region(srv))})
		}
	case "apply-serial":
		n, err := strconv.ParseUint(pos[1], 10, 64)
		if err != nil {
			s.t.Fatalf("line %d: %v", b.line, err)
		}
		evs = append(evs, rollout.Applied{Epoch: e, Server: pos[0], Serial: n, Previous: lastGoodRef(s.region(pos[0]))})
	case "apply-fail":
		evs = append(evs, rollout.ApplyFailed{Epoch: e, Server: pos[0], Reason: strings.Join(pos[1:], " ")})
	case "gate":
		g := rollout.GateResult{Epoch: e, Stage: s.rec.Stage, After: s.metrics(kv)}
		for _, a := range args {
			if v, ok := strings.CutPrefix(a, "probe="); ok {
				parts := strings.Split(v, ":")
				id, _ := strconv.ParseUint(parts[2], 10, 32)
				g.Probes = append(g.Probes, rollout.ProbeFailure{Server: parts[0], Keyset: parts[1], KeyID: uint32(id), Reason: "message authentication failed"})
			}
		}
		evs = append(evs, g)
	case "rolled-back":
		for _, srv := range pos {
			serial := uint64(bundleSerial + 1)
			if v, ok := kv["serial"]; ok {
				serial, _ = strconv.ParseUint(v, 10, 64)
			}
			evs = append(evs, rollout.RolledBack{Epoch: e, Server: srv, Serial: serial})
		}
	case "rollback-fail":
		evs = append(evs, rollout.RollbackFailed{Epoch: e, Server: pos[0], Reason: strings.Join(pos[1:], " ")})
	case "takeover":
		n := s.rec.Epoch + 1
		if v, ok := kv["epoch"]; ok {
			n, _ = strconv.ParseUint(v, 10, 64)
		}
		evs = append(evs, rollout.TookOver{Epoch: n, By: fmt.Sprintf("ctl-%d", n)})
	case "epoch":
		n, err := strconv.ParseUint(pos[0], 10, 64)
		if err != nil {
			s.t.Fatalf("line %d: %v", b.line, err)
		}
		s.epoch = n
		return fmt.Sprintf("events now from epoch %d", n)
	case "advance":
		d, err := time.ParseDuration(pos[0])
		if err != nil {
			s.t.Fatalf("line %d: %v", b.line, err)
		}
		s.now = s.now.Add(d)
		return "now " + s.now.Format(time.RFC3339)
	case "crash":
		s.rec = reload(s.t, s.rec)
		return "reloaded the record\n" + actionLines(rollout.Actions(s.rec)) + s.summary()
	case "status":
		return rollout.Status(s.rec)
	default:
		s.t.Fatalf("line %d: unknown command %q", b.line, cmd)
	}
	var out strings.Builder
	for _, ev := range evs {
		out.WriteString(s.step(ev))
	}
	out.WriteString(s.summary())
	return out.String()
}

func (s *scriptState) newRollout(kv map[string]string, input []string) string {
	s.t.Helper()
	fleet := map[string][]string{}
	var order []string
	for _, l := range input {
		region, servers, ok := strings.Cut(l, ":")
		if !ok {
			s.t.Fatalf("fleet line %q: want region: servers...", l)
		}
		region = strings.TrimSpace(region)
		order = append(order, region)
		fleet[region] = strings.Fields(servers)
	}
	ch := rollout.Change{By: "alice", Why: "add demo/notes version 3"}
	for _, r := range order {
		ch.Bundles = append(ch.Bundles, newRef(r))
	}
	var opts rollout.Options
	if v, ok := kv["regions"]; ok {
		opts.Regions = strings.Split(v, ",")
	}
	atoi := func(k string) int {
		n, _ := strconv.Atoi(kv[k])
		return n
	}
	dur := func(k string) time.Duration {
		d, _ := time.ParseDuration(kv[k])
		return d
	}
	opts.Canary, opts.WaveSize = atoi("canary"), atoi("wave")
	opts.CanaryBake, opts.RegionBake, opts.WaveBake = dur("bake-canary"), dur("bake-region"), dur("bake-wave")
	if v, ok := kv["max-err"]; ok {
		opts.Thresholds.MaxErrorRateIncrease, _ = strconv.ParseFloat(v, 64)
	}
	if v, ok := kv["max-p99"]; ok {
		opts.Thresholds.MaxP99Ratio, _ = strconv.ParseFloat(v, 64)
	}
	if v, ok := kv["keysets"]; ok {
		for _, k := range strings.Split(v, ";") {
			name, regions, _ := strings.Cut(k, ":")
			ch.Keysets = append(ch.Keysets, rollout.KeysetScope{Name: name, Regions: strings.Split(regions, ",")})
		}
	}
	p, err := rollout.NewPlan(ch, fleet, opts)
	if err != nil {
		return "error: " + err.Error()
	}
	id := kv["id"]
	if id == "" {
		id = "r1"
	}
	s.epoch = 1
	s.rec = rollout.NewRecord(id, p, "ctl-1", s.epoch, s.now)
	s.ready = true
	if err := rollout.Check(s.rec); err != nil {
		s.t.Fatalf("Check(NewRecord) = %v", err)
	}
	return p.String()
}

func (s *scriptState) region(server string) string {
	for _, st := range s.rec.Plan.Stages {
		for _, t := range st.Targets {
			if slices.Contains(t.Servers, server) {
				return t.Region
			}
		}
	}
	return "nowhere"
}

func (s *scriptState) metrics(kv map[string]string) rollout.Metrics {
	m := rollout.Metrics{ErrorRate: 0.001, P99: 8 * time.Millisecond}
	if v, ok := kv["err"]; ok {
		m.ErrorRate, _ = strconv.ParseFloat(v, 64)
	}
	if v, ok := kv["p99"]; ok {
		m.P99, _ = time.ParseDuration(v)
	}
	if v, ok := kv["notready"]; ok {
		m.NotReady = strings.Split(v, ",")
	}
	return m
}

// step applies one event with every cross-check, and prints the actions or
// the error.
func (s *scriptState) step(ev rollout.Event) string {
	t := s.t
	t.Helper()
	before := encode(t, s.rec)
	reloaded := reload(t, s.rec)
	if diff := cmp.Diff(actionLines(rollout.Actions(s.rec)), actionLines(rollout.Actions(reloaded))); diff != "" {
		t.Fatalf("Actions differ after a reload (-live +reloaded):\n%s", diff)
	}
	next, acts, err := rollout.Next(s.rec, ev, s.now)
	if got := encode(t, s.rec); !bytes.Equal(got, before) {
		t.Fatalf("Next(%T) modified its input record", ev)
	}
	rnext, racts, rerr := rollout.Next(reloaded, ev, s.now)
	if fmt.Sprint(err) != fmt.Sprint(rerr) || !bytes.Equal(encode(t, next), encode(t, rnext)) || actionLines(acts) != actionLines(racts) {
		t.Fatalf("Next(%T) differs on a reloaded record:\nlive: %v\n%s\nreloaded: %v\n%s", ev, err, actionLines(acts), rerr, actionLines(racts))
	}
	if err != nil {
		if !bytes.Equal(encode(t, next), before) || acts != nil {
			t.Fatalf("Next(%T) = %v, but returned a changed record or actions", ev, err)
		}
		return "error: " + err.Error() + "\n"
	}
	if err := rollout.Check(next); err != nil {
		t.Fatalf("Check after %T: %v", ev, err)
	}
	checkActions(t, next, acts)
	s.rec = next
	return actionLines(acts)
}

// checkActions asserts what the actions may ask for, given the record they
// came with.
func checkActions(t *testing.T, rec rollout.Record, acts []rollout.Action) {
	t.Helper()
	stage := rec.Plan.Stages[rec.Stage]
	inStage := func(servers []string) bool {
		for _, s := range servers {
			if !slices.Contains(stage.Servers(), s) {
				return false
			}
		}
		return true
	}
	for _, a := range acts {
		switch a := a.(type) {
		case rollout.DryRunAction:
			if a.Stage != rec.Stage || !inStage(a.Servers) || rec.Paused {
				t.Errorf("%v asked for at stage %d (paused %v)", a, rec.Stage+1, rec.Paused)
			}
		case rollout.ApplyAction:
			if a.Stage != rec.Stage || !inStage(a.Servers) || rec.Paused {
				t.Errorf("%v asked for at stage %d (paused %v)", a, rec.Stage+1, rec.Paused)
			}
			for _, s := range stage.Servers() {
				if rec.Servers[s].DryRun != rollout.DryRunOK {
					t.Errorf("%v asked for while %s's dry run is %q", a, s, rec.Servers[s].DryRun)
				}
			}
		case rollout.ProbeAction, rollout.MeasureAction:
			if rec.Paused {
				t.Errorf("%v asked for while paused", a)
			}
		case rollout.RollbackAction:
			for _, s := range a.Servers {
				sr := rec.Servers[s]
				if !sr.RollbackWanted || sr.Applied == 0 || a.MinSerial <= sr.Applied || sr.LastGood != a.To {
					t.Errorf("%v asked for server %s: %+v", a, s, sr)
				}
			}
		}
	}
}

func encode(t *testing.T, r rollout.Record) []byte {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// reload is a controller restarting from the stored record.
func reload(t *testing.T, r rollout.Record) rollout.Record {
	t.Helper()
	var out rollout.Record
	if err := json.Unmarshal(encode(t, r), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func actionLines(acts []rollout.Action) string {
	var sb strings.Builder
	for _, a := range acts {
		sb.WriteString(a.String() + "\n")
	}
	return sb.String()
}

func (s *scriptState) summary() string {
	r := s.rec
	p := string(r.Phase)
	if r.Paused {
		p += " paused"
	}
	return fmt.Sprintf("=> epoch %d stage %d/%d %s %s", r.Epoch, r.Stage+1, len(r.Plan.Stages), r.Plan.Stages[r.Stage].Name, p)
}
