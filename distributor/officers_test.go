package distributor_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
)

// TestManifestWithBadOfficers: a pinned manifest that binds a share to an
// officer no one can ever be (not a full SPIFFE ID, named for two shares,
// or of another trust domain than the distributor's) still lets the
// distributor start (it takes the key from its peers; refusing to start
// would turn a broken ceremony into an outage), but an unseal ceremony is
// refused when opened, naming the officer, instead of refusing
// every share later. The file is left as it was. A provisioning ceremony
// refuses such a manifest, and pins nothing.
func TestManifestWithBadOfficers(t *testing.T) {
	w := newWorld(t, 2, 3)
	tests := []struct {
		name string
		mut  func(m *safev1.GenesisManifest)
		want string
	}{
		{"relative officer", func(m *safev1.GenesisManifest) { m.Slots[1].Officer = "officer/global/officer-2" },
			`officer "officer/global/officer-2" of share 2 is not a full SPIFFE ID`},
		{"officer twice", func(m *safev1.GenesisManifest) { m.Slots[2].Officer = officerID(1) },
			"officer " + officerID(1) + " is named for shares 1 and 3"},
		{"officers of another trust domain", func(m *safev1.GenesisManifest) {
			for i, s := range m.GetSlots() {
				s.Officer = fmt.Sprintf("spiffe://other.test/officer/global/officer-%d", i+1)
			}
		}, "officer spiffe://other.test/officer/global/officer-1 of share 1 is not of this distributor's trust domain cairn.test"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := proto.CloneOf(w.manifest)
			tt.mut(m)
			dir := t.TempDir()
			path := filepath.Join(dir, "genesis.json")
			data, err := protojson.Marshal(m) // safe.WriteManifest would refuse it
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			log, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer log.Close()
			srv, err := distributor.New(w.config(dir, "distributor-1", log))
			if err != nil {
				t.Fatalf("distributor.New with a manifest of %s = %v; want it to start", tt.name, err)
			}
			defer srv.Close()
			_, err = srv.OpenCeremony(ctx(t), &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL})
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(fmt.Sprint(err), tt.want) {
				t.Errorf("OpenCeremony(unseal) with a manifest of %s = %v; want FailedPrecondition containing %q", tt.name, err, tt.want)
			}
			if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, data) {
				t.Errorf("the refused manifest file changed (%v)", err)
			}

			// Provisioning such a manifest is refused; nothing is pinned.
			d := w.start("distributor-"+strings.ReplaceAll(tt.name, " ", "-"), false)
			err = officer.Provision(ctx(t), w.client(d.addr, officerID(1)), m, w.rmk)
			if status.Code(errors.Unwrap(err)) != codes.InvalidArgument || !strings.Contains(fmt.Sprint(err), tt.want) {
				t.Errorf("Provision of a manifest with %s = %v; want InvalidArgument containing %q", tt.name, err, tt.want)
			}
			if _, err := os.Stat(filepath.Join(d.dir, "genesis.json")); !os.IsNotExist(err) {
				t.Errorf("a refused provisioning pinned a manifest (%v)", err)
			}
		})
	}
}

// TestRekeyPlanRefusedAtOpen: a rekey plan that could never complete is
// refused when the ceremony is opened, with InvalidArgument naming what is
// wrong, and no ceremony is opened: a new officer that is not a full SPIFFE
// ID, is named twice or is of another trust domain (the new manifest would
// lock that share out of every ceremony), or a recipient key the new share
// cannot be sealed to (every final share would fail, "submit again", until
// the ceremony is cancelled). A good plan still opens.
func TestRekeyPlanRefusedAtOpen(t *testing.T) {
	w := newWorld(t, 2, 3)
	d := w.start("distributor-1", false)
	admin := w.client(d.addr, officerID(1))
	if err := officer.Provision(ctx(t), admin, w.manifest, w.rmk); err != nil {
		t.Fatal(err)
	}
	plan := func(mut func(p *distributorv1.RekeyPlan)) *distributorv1.RekeyPlan {
		p := &distributorv1.RekeyPlan{Threshold: 2}
		for i := range 3 {
			r, err := hpkeseal.NewRecipient()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(r.Close)
			p.Slots = append(p.Slots, &distributorv1.RekeySlot{SafeLabel: fmt.Sprintf("new-%d", i+1), SafeKind: safe.KindInsecureFile,
				Recipient: r.PublicKey(), Officer: officerID(i + 1)})
		}
		mut(p)
		return p
	}
	tests := []struct {
		name string
		mut  func(p *distributorv1.RekeyPlan)
		want string
	}{
		{"relative officer", func(p *distributorv1.RekeyPlan) { p.Slots[1].Officer = "officer/global/officer-2" },
			`officer "officer/global/officer-2" of share 2 is not a full SPIFFE ID`},
		{"officer twice", func(p *distributorv1.RekeyPlan) { p.Slots[2].Officer = officerID(1) },
			"officer " + officerID(1) + " is named for shares 1 and 3"},
		{"officers of another trust domain", func(p *distributorv1.RekeyPlan) {
			for i, s := range p.GetSlots() {
				s.Officer = fmt.Sprintf("spiffe://other.test/officer/global/officer-%d", i+1)
			}
		}, "of share 1 is not of this distributor's trust domain cairn.test"},
		{"short recipient key", func(p *distributorv1.RekeyPlan) { p.Slots[1].Recipient.PublicKey = p.Slots[1].Recipient.PublicKey[:31] },
			"rekey slot 2: recipient key: hpkeseal: public key is 31 bytes"},
		{"recipient key of another KEM", func(p *distributorv1.RekeyPlan) { p.Slots[2].Recipient.KemId = 0x10 },
			"rekey slot 3: recipient key: hpkeseal: public key for KEM 0x0010"},
		{"low-order recipient key", func(p *distributorv1.RekeyPlan) {
			p.Slots[0].Recipient.PublicKey = make([]byte, hpkeseal.PublicKeySize)
		},
			"rekey slot 1: recipient key: hpkeseal: seal:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := admin.OpenCeremony(ctx(t), &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_REKEY, Rekey: plan(tt.mut)})
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(fmt.Sprint(err), tt.want) {
				t.Errorf("OpenCeremony(rekey, %s) = %v; want InvalidArgument containing %q", tt.name, err, tt.want)
			}
			// The last ceremony is still the provisioning one.
			st, err := admin.GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
			if err != nil || st.GetCeremony().GetKind() != distributorv1.CeremonyKind_CEREMONY_KIND_PROVISION {
				t.Errorf("after a refused rekey plan the ceremony = %v, %v; want the provisioning one still", st.GetCeremony(), err)
			}
		})
	}
	c, err := admin.OpenCeremony(ctx(t), &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_REKEY,
		Rekey: plan(func(*distributorv1.RekeyPlan) {})})
	if err != nil || c.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN {
		t.Errorf("OpenCeremony(rekey, a good plan) = %v, %v; want it open", c, err)
	}
}

// TestGetStatusWithholdsRekeyedShares: anyone may call GetStatus, and it
// shows the current ceremony as GetCeremony does for the same caller: a
// rekey's sealed new shares to officers only.
func TestGetStatusWithholdsRekeyedShares(t *testing.T) {
	w := newWorld(t, 2, 3)
	d := w.start("distributor-1", false)
	admin := w.client(d.addr, officerID(1))
	if err := officer.Provision(ctx(t), admin, w.manifest, w.rmk); err != nil {
		t.Fatal(err)
	}
	r, err := officer.OpenRekey(ctx(t), admin, 2, w.newSafes(3), []string{officerID(1), officerID(2), officerID(3)}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for i := range 2 {
		if _, err := w.release(d.addr, r.CeremonyID, i); err != nil {
			t.Fatal(err)
		}
	}
	for _, who := range []struct {
		id     string
		shares int
	}{{officerID(2), 3}, {rootKMSID, 0}, {kmsID, 0}} {
		client := w.client(d.addr, who.id)
		st, err := client.GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		c, err := client.GetCeremony(ctx(t), &distributorv1.GetCeremonyRequest{CeremonyId: r.CeremonyID})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(st.GetCeremony().GetRekeyedShares()); n != who.shares || len(st.GetCeremony().GetRekeyedManifest()) == 0 {
			t.Errorf("GetStatus as %s: %d rekeyed sealed shares, manifest %d bytes; want %d and the manifest", who.id, n, len(st.GetCeremony().GetRekeyedManifest()), who.shares)
		}
		if !proto.Equal(st.GetCeremony(), c) {
			t.Errorf("GetStatus as %s shows the ceremony as\n%v\nGetCeremony as\n%v", who.id, st.GetCeremony(), c)
		}
	}
}
