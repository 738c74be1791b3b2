package keystore

import (
	"maps"
	"slices"
	"time"

	"github.com/cairnkms/cairn/internal/safety"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// ErrUnsafe is matched (errors.Is) by every refusal of Check: it is
// safety.ErrUnsafe, the Safety Condition's refusal wherever it is checked.
var ErrUnsafe = safety.ErrUnsafe

// History is the usage and TTL history a server holds beside its served
// store: that of versions and keysets the store lacks (read at a boot while
// nothing is served, or carried since they left the served bundle) whose
// ciphertexts may still be live.
type History struct {
	Usage []UsageRecord
	TTL   map[string][]safety.TTLPeriod
}

// self names this server in the blockers of a refusal.
const self = "(this server)"

// minWindow stands in for a propagation window of zero (a bundle built
// before it was carried): internal/safety wants a positive one.
const minWindow = time.Nanosecond

// Check is the KMS's own check of the Safety Condition before it serves next
// instead of cur (nil: nothing served), as defence in depth behind regionctl
// and the root KMS. It runs internal/safety's rules in safety.ScopeLocal, the
// fleet being this server with its usage (of cur, and of hist), and the
// record being what the bundles carry. It returns nil, or safety.Refusals
// naming each keyset, version, blocker and earliest safe time. There is no
// override: force does not apply here.
//
// For every keyset (of cur, next or hist), with E its effective TTL (the
// longest TTL still live in this server's own TTL history, the bundles'
// ttl_history, and the records of hist) and W its propagation window:
//
//   - a version leaving the decrypt set (decrypting in cur or hist, not in
//     next: disabled, destroyed, dropped, or its keyset dropped) is refused
//     while this server's last encryption or last use of it + E + W is after
//     now (a decryption is evidence of a ciphertext of unknown age, so a use
//     counts as an encryption here), or its lifecycle (next's, else cur's)
//     says it was primary and superseded_at + E + W is after now, or was
//     primary with no superseded_at;
//   - a version primary in next but not in cur is refused if cur serves
//     something, holds the keyset, and does not serve the version decrypting
//     (so a bundle that adds a version and makes it primary at once is
//     refused), and, when next's lifecycle has the version, unless
//     propagated_everywhere + W ≤ now (for every region of the keyset: the
//     bundle carries one time for all).
//
// This server's serving a version as primary does not block its retirement
// by itself (safety.ServedVersion.Primary is not set): its encryptions are
// its last encrypt, and the swap ends them.
func Check(region string, cur *Store, hist History, next *Store, now time.Time) error {
	served := map[string]bool{}
	if cur != nil {
		for _, n := range cur.names {
			served[n] = true
		}
	}
	carried := map[string][]UsageRecord{}
	for _, r := range hist.Usage {
		carried[r.Keyset] = append(carried[r.Keyset], r)
	}
	names := slices.Collect(maps.Keys(served))
	for n := range carried {
		if !served[n] {
			names = append(names, n)
		}
	}
	for _, n := range next.names {
		if !served[n] && carried[n] == nil {
			names = append(names, n)
		}
	}
	slices.Sort(names)

	var out safety.Refusals
	for _, name := range names {
		var ck *Keyset
		if cur != nil {
			ck = cur.keysets[name]
		}
		nk := next.keysets[name]
		c := keysetCheck{region: region, name: name, cur: ck, next: nk, carried: carried[name], ttl: hist.TTL[name], now: now}
		out = append(out, c.run(cur != nil && cur.Len() > 0)...)
	}
	if len(out) > 0 {
		return out
	}
	return nil
}

// keysetCheck checks one keyset's transition from cur (and the carried
// records) to next; either keyset may be nil.
type keysetCheck struct {
	region    string
	name      string
	cur, next *Keyset
	carried   []UsageRecord
	ttl       []safety.TTLPeriod // carried TTL history
	now       time.Time
}

func (c *keysetCheck) run(serving bool) []*safety.Refusal {
	was := map[uint32]bool{} // decrypting in cur or the carried records
	for _, v := range c.cur.versionsOrNil() {
		if v.Decrypts() {
			was[v.keyID] = true
		}
	}
	for _, r := range c.carried {
		if r.Decrypting {
			was[r.KeyID] = true
		}
	}
	var out []*safety.Refusal
	for _, id := range slices.Sorted(maps.Keys(was)) {
		if nv, ok := c.next.version(id); ok && nv.Decrypts() {
			continue
		}
		if err := safety.CheckRetire(c.record(), id, c.fleet(), safety.ScopeLocal, c.params(), c.now); err != nil {
			out = append(out, refusalOf(err))
		}
	}
	if c.next == nil || c.cur == nil {
		// A keyset new to this server is not a promotion here: it never
		// served the keyset, so it holds no clients' ciphertexts of it, and
		// the first version is primary from the keyset's creation (see
		// safety.CheckBundle).
		return out
	}
	id := c.next.primary.keyID
	cv, inCur := c.cur.version(id)
	if inCur && cv.status == cryptov1.KeyStatus_KEY_STATUS_PRIMARY {
		return out
	}
	var r *safety.Refusal
	if _, ok := c.next.lifecycle[id]; ok {
		if err := safety.CheckPromote(c.record(), id, c.fleet(), safety.ScopeLocal, c.params(), c.now); err != nil {
			r = refusalOf(err)
		}
	}
	if serving && !(inCur && cv.Decrypts()) {
		if r == nil {
			r = &safety.Refusal{Keyset: c.name, KeyID: id, Step: safety.StepPromote}
		}
		// No earliest time: only another bundle (decrypt-only first) helps.
		r.Blockers = append(r.Blockers, safety.Blocker{Region: c.region, Server: self,
			Reason: "does not serve it decrypting yet: a bundle that adds a version and makes it primary at once is refused; ship it decrypt-only first"})
		r.Earliest = time.Time{}
	}
	if r != nil {
		out = append(out, r)
	}
	return out
}

// refusalOf returns the *safety.Refusal err is; anything else (invalid
// parameters, which Check never passes) becomes a refusal with no earliest
// time, so that the check stays closed.
func refusalOf(err error) *safety.Refusal {
	if r, ok := err.(*safety.Refusal); ok {
		return r
	}
	return &safety.Refusal{Blockers: []safety.Blocker{{Reason: "cannot be checked: " + err.Error()}}}
}

// params is the keyset's propagation window: the longer of cur's and
// next's, at least minWindow.
func (c *keysetCheck) params() safety.Params {
	w := minWindow
	for _, k := range []*Keyset{c.cur, c.next} {
		if k != nil {
			w = max(w, k.window)
		}
	}
	for _, r := range c.carried {
		w = max(w, r.Window)
	}
	return safety.Params{Window: w}
}

// record is the keyset's record as the bundles carry it.
func (c *keysetCheck) record() safety.Keyset {
	k := safety.Keyset{Name: c.name, Regions: []string{c.region}}
	for _, ks := range []*Keyset{c.cur, c.next} {
		if ks == nil {
			continue
		}
		k.Regions = append(k.Regions, ks.regions...)
		k.TTL = append(k.TTL, ks.ttlHistory...)
		k.TTL = append(k.TTL, ks.recordTTL...)
		k.TTL = append(k.TTL, safety.TTLPeriod{TTL: ks.ttl}) // in force while served
	}
	k.TTL = append(k.TTL, c.ttl...)
	for _, r := range c.carried {
		if r.TTL > 0 {
			// The effective TTL when the record was taken: it counts
			// until the record is dropped (Live).
			k.TTL = append(k.TTL, safety.TTLPeriod{TTL: r.TTL})
		}
	}
	slices.Sort(k.Regions)
	k.Regions = slices.Compact(k.Regions)
	ids := map[uint32]bool{}
	for _, ks := range []*Keyset{c.cur, c.next} {
		if ks != nil {
			for id := range ks.lifecycle {
				ids[id] = true
			}
		}
	}
	for _, id := range slices.Sorted(maps.Keys(ids)) {
		l, ok := c.next.lifecycleOf(id)
		if !ok {
			l, _ = c.cur.lifecycleOf(id)
		}
		v := safety.Version{KeyID: id, State: safety.Disabled, PrimarySince: l.PrimarySince, SupersededAt: l.SupersededAt}
		if nv, ok := c.next.version(id); ok {
			v.State = stateOf(nv.status)
		}
		if !l.PropagatedEverywhere.IsZero() {
			v.Propagated = make(map[string]time.Time, len(k.Regions))
			for _, r := range k.Regions {
				v.Propagated[r] = l.PropagatedEverywhere
			}
		}
		k.Versions = append(k.Versions, v)
	}
	return k
}

// fleet is this server, with its usage of the keyset's versions.
func (c *keysetCheck) fleet() safety.Fleet {
	vs := map[uint32]safety.ServedVersion{}
	note := func(id uint32, decrypts bool, lastEnc, lastUse time.Time) {
		sv := vs[id]
		sv.Decrypts = sv.Decrypts || decrypts
		// The TTL runs from the last encryption: a decryption makes no
		// ciphertext (it counts against the window, as last use). Counting
		// decryptions as encryptions would let a client reading old data
		// near the end of its TTL hold a retirement back by another TTL,
		// and this server would then refuse every later bundle of its
		// region although the fleet-wide check allowed the retirement.
		if lastEnc.After(sv.LastEncrypt) {
			sv.LastEncrypt = lastEnc
		}
		if lastUse.After(sv.LastUse) {
			sv.LastUse = lastUse
		}
		vs[id] = sv
	}
	for _, v := range c.cur.versionsOrNil() {
		u := v.Usage()
		note(v.keyID, v.Decrypts(), u.LastEncrypt, u.LastUse)
	}
	for _, r := range c.carried {
		note(r.KeyID, r.Decrypting, r.lastEncrypt(), r.LastUse)
	}
	return safety.Fleet{Servers: []safety.Server{{Region: c.region, Name: self, Known: true,
		Keysets: map[string]safety.ServedKeyset{c.name: {Versions: vs}}}}}
}

// stateOf is the record state a bundle's key status stands for.
func stateOf(s cryptov1.KeyStatus) safety.State {
	switch s {
	case cryptov1.KeyStatus_KEY_STATUS_PRIMARY:
		return safety.Primary
	case cryptov1.KeyStatus_KEY_STATUS_ENABLED:
		return safety.Enabled
	case cryptov1.KeyStatus_KEY_STATUS_DESTROYED:
		return safety.Destroyed
	}
	return safety.Disabled
}

// version is Version on a possibly nil keyset.
func (k *Keyset) version(keyID uint32) (*Version, bool) {
	if k == nil {
		return nil, false
	}
	return k.Version(keyID)
}

// versionsOrNil is Versions on a possibly nil keyset.
func (k *Keyset) versionsOrNil() []*Version {
	if k == nil {
		return nil
	}
	return k.versions
}

// lifecycleOf is the lifecycle the bundle carries for keyID, on a possibly
// nil keyset.
func (k *Keyset) lifecycleOf(keyID uint32) (Lifecycle, bool) {
	if k == nil {
		return Lifecycle{}, false
	}
	l, ok := k.lifecycle[keyID]
	return l, ok
}
