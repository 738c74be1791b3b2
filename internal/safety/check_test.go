package safety_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/internal/safety"
)

var p = safety.Params{Window: 10 * time.Minute}

// fixture is keyset demo/notes in us-east and eu-west, TTL 1h: v1 enabled
// (superseded two days ago), v2 primary, v3 enabled and propagated to
// us-east 30 minutes and eu-west 5 minutes before t0; us-east kms-1 and
// kms-2 and eu-west kms-1 serve all three; v2 was last used a minute before
// t0, v1 a day before.
func fixture() (safety.Keyset, safety.Fleet) {
	k := safety.Keyset{
		Name:    "demo/notes",
		Regions: []string{"us-east", "eu-west"},
		TTL:     safety.WithTTL(nil, time.Hour, t0.Add(-100*day)),
		Versions: []safety.Version{
			{KeyID: 1, State: safety.Enabled, Created: t0.Add(-60 * day), PrimarySince: t0.Add(-30 * day), SupersededAt: t0.Add(-2 * day),
				Propagated: map[string]time.Time{"us-east": t0.Add(-60 * day), "eu-west": t0.Add(-60 * day)}},
			{KeyID: 2, State: safety.Primary, Created: t0.Add(-3 * day), PrimarySince: t0.Add(-2 * day),
				Propagated: map[string]time.Time{"us-east": t0.Add(-3 * day), "eu-west": t0.Add(-3 * day)}},
			{KeyID: 3, State: safety.Enabled, Created: t0.Add(-time.Hour),
				Propagated: map[string]time.Time{"us-east": t0.Add(-30 * time.Minute), "eu-west": t0.Add(-5 * time.Minute)}},
		},
	}
	var f safety.Fleet
	for _, s := range [][2]string{{"us-east", "kms-1"}, {"us-east", "kms-2"}, {"eu-west", "kms-1"}} {
		f.Servers = append(f.Servers, safety.Server{Region: s[0], Name: s[1], Known: true, Keysets: map[string]safety.ServedKeyset{
			"demo/notes": {Versions: map[uint32]safety.ServedVersion{
				1: {Decrypts: true, LastUse: t0.Add(-day)},
				2: {Decrypts: true, Primary: true, LastEncrypt: t0.Add(-time.Minute), LastUse: t0.Add(-time.Minute)},
				3: {Decrypts: true},
			}},
		}})
	}
	return k, f
}

// setUsage changes one server's view of one version.
func setUsage(f *safety.Fleet, i int, id uint32, edit func(*safety.ServedVersion)) {
	sv := f.Servers[i].Keysets["demo/notes"].Versions[id]
	edit(&sv)
	f.Servers[i].Keysets["demo/notes"].Versions[id] = sv
}

// outcome is what a test expects of a check: nil (ok), or a refusal naming
// exactly regions and servers, with earliest safe time earliest.
type outcome struct {
	ok       bool
	regions  []string
	servers  []string
	earliest time.Time
	text     string // a substring of the error, if not empty
}

func checkOutcome(t *testing.T, call string, err error, want outcome) {
	t.Helper()
	if want.ok {
		if err != nil {
			t.Errorf("%s = %v, want nil", call, err)
		}
		return
	}
	var r *safety.Refusal
	if !errors.Is(err, safety.ErrUnsafe) || !errors.As(err, &r) {
		t.Fatalf("%s = %v, want a *Refusal matching ErrUnsafe", call, err)
	}
	got := outcome{regions: r.Regions(), servers: r.Servers(), earliest: r.Earliest}
	if !strings.Contains(err.Error(), want.text) {
		t.Errorf("%s = %q, want it to contain %q", call, err, want.text)
	}
	want.text = ""
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(outcome{})); diff != "" {
		t.Errorf("%s = %v, want regions, servers, earliest as in -want +got:\n%s", call, err, diff)
	}
}

func TestCheckPromote(t *testing.T) {
	tests := []struct {
		name  string
		id    uint32
		edit  func(*safety.Keyset, *safety.Fleet)
		scope safety.Scope
		now   time.Time
		want  outcome
	}{
		{name: "propagated everywhere for the window", id: 3, now: t0.Add(5 * time.Minute), want: outcome{ok: true}},
		{name: "one region within the window", id: 3, now: t0,
			want: outcome{regions: []string{"eu-west"}, earliest: t0.Add(5 * time.Minute), text: "region eu-west has served it decrypting only since 2026-03-01T09:55:00Z"}},
		{name: "one region not propagated", id: 3, now: t0.Add(time.Hour),
			edit: func(k *safety.Keyset, _ *safety.Fleet) { delete(k.Versions[2].Propagated, "eu-west") },
			want: outcome{regions: []string{"eu-west"}, text: "region eu-west has not served it decrypting on every server yet"}},
		{name: "unknown server", id: 3, now: t0.Add(time.Hour),
			edit: func(_ *safety.Keyset, f *safety.Fleet) { f.Servers[1].Known = false },
			want: outcome{regions: []string{"us-east"}, servers: []string{"us-east/kms-2"}, text: "is unreachable or its usage is unknown"}},
		{name: "unknown server, local scope", id: 3, now: t0.Add(time.Hour), scope: safety.ScopeLocal,
			edit: func(_ *safety.Keyset, f *safety.Fleet) { f.Servers[1].Known = false },
			want: outcome{ok: true}},
		{name: "server does not serve it", id: 3, now: t0.Add(time.Hour),
			edit: func(_ *safety.Keyset, f *safety.Fleet) { delete(f.Servers[2].Keysets["demo/notes"].Versions, 3) },
			want: outcome{regions: []string{"eu-west"}, servers: []string{"eu-west/kms-1"}, text: "does not serve it decrypting"}},
		{name: "a keyset's first version, primary since creation, was never promoted", id: 3, now: t0,
			edit: func(k *safety.Keyset, _ *safety.Fleet) {
				v := &k.Versions[2]
				v.State, v.PrimarySince, v.SupersededAt, v.Propagated = safety.Primary, v.Created, time.Time{}, nil
			},
			want: outcome{ok: true}},
		{name: "a primary promoted after its creation is judged", id: 3, now: t0,
			edit: func(k *safety.Keyset, _ *safety.Fleet) {
				v := &k.Versions[2]
				v.State, v.PrimarySince, v.Propagated = safety.Primary, v.Created.Add(time.Second), nil
			},
			want: outcome{regions: []string{"eu-west", "us-east"}, text: "has not served it decrypting on every server yet"}},
		{name: "server serving nothing is not waited for", id: 3, now: t0.Add(time.Hour),
			edit: func(_ *safety.Keyset, f *safety.Fleet) { f.Servers[2].Keysets = nil },
			want: outcome{ok: true}},
		{name: "server of another region does not matter", id: 3, now: t0.Add(time.Hour),
			edit: func(_ *safety.Keyset, f *safety.Fleet) {
				f.Servers = append(f.Servers, safety.Server{Region: "ap-south", Name: "kms-1"})
			},
			want: outcome{ok: true}},
		{name: "disabled version", id: 3, now: t0.Add(time.Hour),
			edit: func(k *safety.Keyset, _ *safety.Fleet) { k.Versions[2].State = safety.Disabled },
			want: outcome{text: "the version is disabled in the record, not enabled"}},
		{name: "version not in the record", id: 9, now: t0.Add(time.Hour), want: outcome{text: "the version is not in the record"}},
		{name: "already primary", id: 2, now: t0, want: outcome{ok: true}},
		{name: "no regions", id: 3, now: t0.Add(time.Hour),
			edit: func(k *safety.Keyset, _ *safety.Fleet) { k.Regions = nil },
			want: outcome{text: "the record lists no region for the keyset"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, f := fixture()
			if tt.edit != nil {
				tt.edit(&k, &f)
			}
			scope := tt.scope
			if scope == 0 {
				scope = safety.ScopeFleet
			}
			err := safety.CheckPromote(k, tt.id, f, scope, p, tt.now)
			checkOutcome(t, fmt.Sprintf("CheckPromote(version %d)", tt.id), err, tt.want)
		})
	}
}

func TestCheckRetire(t *testing.T) {
	tests := []struct {
		name  string
		id    uint32
		edit  func(*safety.Keyset, *safety.Fleet)
		scope safety.Scope
		now   time.Time
		want  outcome
	}{
		{name: "superseded long ago, unused", id: 1, now: t0, want: outcome{ok: true}},
		{name: "never primary, unused", id: 3, now: t0, want: outcome{ok: true}},
		{name: "primary in the record", id: 2, now: t0.Add(30 * day),
			edit: func(_ *safety.Keyset, f *safety.Fleet) {
				for i := range f.Servers {
					setUsage(f, i, 2, func(sv *safety.ServedVersion) { sv.Primary = false })
				}
			},
			want: outcome{text: "it is primary in the record"}},
		{name: "primary on a lagging server", id: 1, now: t0,
			edit: func(_ *safety.Keyset, f *safety.Fleet) {
				setUsage(f, 2, 1, func(sv *safety.ServedVersion) { sv.Primary = true })
			},
			want: outcome{regions: []string{"eu-west"}, servers: []string{"eu-west/kms-1"}, text: "region eu-west server kms-1 serves it as primary"}},
		{name: "superseded within TTL plus window", id: 1, now: t0,
			edit: func(k *safety.Keyset, _ *safety.Fleet) { k.Versions[0].SupersededAt = t0.Add(-30 * time.Minute) },
			want: outcome{earliest: t0.Add(40 * time.Minute), text: "it was superseded at 2026-03-01T09:30:00Z (effective TTL 1h0m0s, window 10m0s)"}},
		{name: "was primary, supersession unknown", id: 1, now: t0,
			edit: func(k *safety.Keyset, _ *safety.Fleet) { k.Versions[0].SupersededAt = time.Time{} },
			want: outcome{text: "no time it was superseded"}},
		{name: "a server encrypted with it after supersession", id: 1, now: t0,
			edit: func(_ *safety.Keyset, f *safety.Fleet) {
				setUsage(f, 1, 1, func(sv *safety.ServedVersion) {
					sv.LastEncrypt, sv.LastUse = t0.Add(-30*time.Minute), t0.Add(-30*time.Minute)
				})
			},
			want: outcome{regions: []string{"us-east"}, servers: []string{"us-east/kms-2"}, earliest: t0.Add(40 * time.Minute)}},
		{name: "a server decrypted with it within the window", id: 1, now: t0,
			edit: func(_ *safety.Keyset, f *safety.Fleet) {
				setUsage(f, 0, 1, func(sv *safety.ServedVersion) { sv.LastUse = t0.Add(-5 * time.Minute) })
			},
			want: outcome{regions: []string{"us-east"}, servers: []string{"us-east/kms-1"}, earliest: t0.Add(5 * time.Minute), text: "used it at 2026-03-01T09:55:00Z (window 10m0s)"}},
		{name: "unknown server", id: 1, now: t0,
			edit: func(_ *safety.Keyset, f *safety.Fleet) { f.Servers[2].Known = false },
			want: outcome{regions: []string{"eu-west"}, servers: []string{"eu-west/kms-1"}}},
		{name: "local scope judges only listed servers", id: 1, now: t0, scope: safety.ScopeLocal,
			edit: func(_ *safety.Keyset, f *safety.Fleet) { f.Servers = f.Servers[:1] },
			want: outcome{ok: true}},
		{name: "local scope: a listed unknown server", id: 1, now: t0, scope: safety.ScopeLocal,
			edit: func(_ *safety.Keyset, f *safety.Fleet) { f.Servers = f.Servers[:1]; f.Servers[0].Known = false },
			want: outcome{regions: []string{"us-east"}, servers: []string{"us-east/kms-1"}}},
		{name: "history lost after the version was created", id: 1, now: t0,
			edit: func(_ *safety.Keyset, f *safety.Fleet) { f.Servers[0].HistoryFrom = t0.Add(-20 * time.Minute) },
			want: outcome{regions: []string{"us-east"}, servers: []string{"us-east/kms-1"}, earliest: t0.Add(50 * time.Minute), text: "lost its usage history at 2026-03-01T09:40:00Z"}},
		{name: "history lost before the version was created", id: 3, now: t0,
			edit: func(_ *safety.Keyset, f *safety.Fleet) { f.Servers[0].HistoryFrom = t0.Add(-2 * time.Hour) },
			want: outcome{ok: true}},
		{name: "no TTL history", id: 1, now: t0,
			edit: func(k *safety.Keyset, _ *safety.Fleet) { k.TTL = nil },
			want: outcome{text: "the record has no TTL history for the keyset"}},
		{name: "a known server of another region still reports it", id: 1, now: t0,
			edit: func(_ *safety.Keyset, f *safety.Fleet) {
				f.Servers = append(f.Servers, safety.Server{Region: "ap-south", Name: "kms-1", Known: true, Keysets: map[string]safety.ServedKeyset{
					"demo/notes": {Versions: map[uint32]safety.ServedVersion{1: {Decrypts: true, LastUse: t0.Add(-time.Minute)}}}}})
			},
			want: outcome{regions: []string{"ap-south"}, servers: []string{"ap-south/kms-1"}, earliest: t0.Add(9 * time.Minute)}},
		{name: "an unknown server of another region does not matter", id: 1, now: t0,
			edit: func(_ *safety.Keyset, f *safety.Fleet) {
				f.Servers = append(f.Servers, safety.Server{Region: "ap-south", Name: "kms-1"})
			},
			want: outcome{ok: true}},
		{name: "earliest is the latest blocker", id: 1, now: t0,
			edit: func(k *safety.Keyset, f *safety.Fleet) {
				k.Versions[0].SupersededAt = t0.Add(-30 * time.Minute)
				setUsage(f, 2, 1, func(sv *safety.ServedVersion) { sv.LastEncrypt = t0.Add(-10 * time.Minute) })
			},
			want: outcome{regions: []string{"eu-west"}, servers: []string{"eu-west/kms-1"}, earliest: t0.Add(time.Hour)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, f := fixture()
			if tt.edit != nil {
				tt.edit(&k, &f)
			}
			scope := tt.scope
			if scope == 0 {
				scope = safety.ScopeFleet
			}
			checkOutcome(t, "CheckRetire", safety.CheckRetire(k, tt.id, f, scope, p, tt.now), tt.want)
		})
	}
}

func content(vs map[uint32]safety.Serving) safety.Content { return safety.Content{"demo/notes": vs} }

var (
	dec = safety.Serving{Decrypts: true}
	pri = safety.Serving{Decrypts: true, Primary: true}
)

func TestCheckBundle(t *testing.T) {
	cur := content(map[uint32]safety.Serving{1: dec, 2: pri, 3: dec})
	type refusal struct {
		KeyID uint32
		Step  safety.Step
	}
	tests := []struct {
		name      string
		cur, next safety.Content
		edit      func(*safety.Keyset, *safety.Fleet)
		record    bool // false: the record lacks the keyset
		now       time.Time
		want      []refusal
		text      string
	}{
		{name: "no change", cur: cur, next: cur, record: true, now: t0},
		{name: "drop a retirable version", cur: cur, next: content(map[uint32]safety.Serving{2: pri, 3: dec}), record: true, now: t0},
		{name: "disable the primary", cur: cur, next: content(map[uint32]safety.Serving{1: dec, 3: pri}), record: true, now: t0.Add(time.Hour),
			want: []refusal{{2, safety.StepRetire}}, text: "it is primary in the record"},
		{name: "promote a propagated version", cur: cur, next: content(map[uint32]safety.Serving{1: dec, 2: dec, 3: pri}), record: true, now: t0.Add(time.Hour)},
		{name: "promote within the window", cur: cur, next: content(map[uint32]safety.Serving{1: dec, 2: dec, 3: pri}), record: true, now: t0,
			want: []refusal{{3, safety.StepPromote}}, text: "region eu-west has served it decrypting only since"},
		{name: "add and promote at once", cur: content(map[uint32]safety.Serving{1: dec, 2: pri}), next: content(map[uint32]safety.Serving{1: dec, 2: dec, 3: pri}),
			record: true, now: t0.Add(time.Hour),
			want: []refusal{{3, safety.StepPromote}}, text: "region us-east is pushed a bundle that adds it and makes it primary at once"},
		{name: "fresh server", cur: nil, next: cur, record: true, now: t0},
		{name: "fresh server, unpropagated primary", cur: nil, next: content(map[uint32]safety.Serving{1: dec, 2: dec, 3: pri}), record: true, now: t0,
			want: []refusal{{3, safety.StepPromote}}},
		{name: "drop the keyset", cur: cur, next: safety.Content{}, record: true, now: t0,
			want: []refusal{{2, safety.StepRetire}}},
		{name: "keyset not in the record, unused version", cur: cur, next: content(map[uint32]safety.Serving{2: pri, 3: dec}), record: false, now: t0},
		{name: "keyset not in the record, encrypted version", cur: cur, next: content(map[uint32]safety.Serving{1: dec, 3: dec}), record: false, now: t0.Add(day),
			edit: func(_ *safety.Keyset, f *safety.Fleet) {
				for i := range f.Servers {
					setUsage(f, i, 2, func(sv *safety.ServedVersion) { sv.Primary = false })
				}
			},
			want: []refusal{{2, safety.StepRetire}}, text: "the keyset is not in the record, so its TTL is unknown"},
		{name: "keyset not in the record, promotion", cur: cur, next: content(map[uint32]safety.Serving{1: dec, 2: dec, 3: pri}), record: false, now: t0.Add(day),
			want: []refusal{{3, safety.StepPromote}}, text: "the keyset is not in the record, so propagation cannot be shown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, f := fixture()
			if tt.edit != nil {
				tt.edit(&k, &f)
			}
			record := map[string]safety.Keyset{}
			if tt.record {
				record[k.Name] = k
			}
			err := safety.CheckBundle("us-east", tt.cur, tt.next, record, f, safety.ScopeFleet, p, tt.now)
			var got []refusal
			var rs safety.Refusals
			if errors.As(err, &rs) {
				for _, r := range rs {
					got = append(got, refusal{r.KeyID, r.Step})
				}
			} else if err != nil {
				t.Fatalf("CheckBundle = %v (%T), want nil or Refusals", err, err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("CheckBundle = %v, want refusals -want +got:\n%s", err, diff)
			}
			if err != nil && !errors.Is(err, safety.ErrUnsafe) {
				t.Errorf("errors.Is(CheckBundle, ErrUnsafe) = false, want true")
			}
			if tt.text != "" && (err == nil || !strings.Contains(err.Error(), tt.text)) {
				t.Errorf("CheckBundle = %v, want it to contain %q", err, tt.text)
			}
		})
	}
}

func TestRefusalMessages(t *testing.T) {
	k, f := fixture()
	setUsage(&f, 1, 1, func(sv *safety.ServedVersion) { sv.LastUse = t0.Add(-time.Minute) })
	err := safety.CheckRetire(k, 1, f, safety.ScopeFleet, p, t0)
	want := `safety: keyset "demo/notes" version 1 cannot leave the decrypt set: region us-east server kms-2 used it at 2026-03-01T09:59:00Z (window 10m0s); earliest safe time 2026-03-01T10:09:00Z`
	if err == nil || err.Error() != want {
		t.Errorf("CheckRetire(used a minute ago) = %v, want %s", err, want)
	}

	f.Servers[2].Known = false
	err = safety.CheckRetire(k, 1, f, safety.ScopeFleet, p, t0)
	want = `safety: keyset "demo/notes" version 1 cannot leave the decrypt set: region eu-west server kms-1 is unreachable or its usage is unknown; region us-east server kms-2 used it at 2026-03-01T09:59:00Z (window 10m0s); earliest safe time unknown`
	if err == nil || err.Error() != want {
		t.Errorf("CheckRetire(unknown server) = %v, want %s", err, want)
	}

	// The earliest safe time is rounded up, never down.
	r := &safety.Refusal{Keyset: "a", KeyID: 7, Step: safety.StepPromote, Blockers: []safety.Blocker{{Region: "r", Reason: "x", Earliest: t0.Add(time.Millisecond)}}, Earliest: t0.Add(time.Millisecond)}
	if got, want := r.Error(), `safety: keyset "a" version 7 cannot become primary: region r x; earliest safe time 2026-03-01T10:00:01Z`; got != want {
		t.Errorf("Refusal.Error() = %s, want %s", got, want)
	}

	// Listings are bounded; the slices are not.
	r = &safety.Refusal{Keyset: "a", KeyID: 7, Step: safety.StepRetire}
	for _, s := range []string{"s1", "s2", "s3", "s4", "s5", "s6", "s7"} {
		r.Blockers = append(r.Blockers, safety.Blocker{Region: "r", Server: s, Reason: "is unreachable"})
	}
	if got := r.Error(); !strings.Contains(got, "server s5 is unreachable; and 2 more; earliest safe time unknown") || strings.Contains(got, "s6") {
		t.Errorf("Refusal.Error() = %s, want 5 blockers and \"and 2 more\"", got)
	}
	var rs safety.Refusals
	for i := range 7 {
		rs = append(rs, &safety.Refusal{Keyset: "a", KeyID: uint32(i), Step: safety.StepRetire, Blockers: []safety.Blocker{{Reason: "x"}}})
	}
	if got := rs.Error(); !strings.HasPrefix(got, "safety: 7 refusals: ") || !strings.HasSuffix(got, " | and 2 more") {
		t.Errorf("Refusals.Error() = %s, want 7 refusals, 5 listed", got)
	}
	var one *safety.Refusal
	if !errors.As(rs, &one) || one != rs[0] || !errors.Is(rs, safety.ErrUnsafe) {
		t.Errorf("errors.As(Refusals, *Refusal) = %v, errors.Is(ErrUnsafe) = %v, want the first refusal, true", one, errors.Is(rs, safety.ErrUnsafe))
	}
}
