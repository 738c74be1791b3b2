package devca_test

import (
	"crypto/x509"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func ExampleCA_Issue() {
	td := spiffeid.RequireTrustDomainFromString("dev.cairn.test")
	ca, err := devca.New(td, time.Now())
	if err != nil {
		log.Fatal(err)
	}
	leaf, err := ca.Issue(spiffeid.RequireFromSegments(td, "kms", "us-east", "kms-1"), devca.LeafOptions{})
	if err != nil {
		log.Fatal(err)
	}

	// A peer that trusts the CA accepts the leaf as an X.509-SVID.
	bundle := x509bundle.FromX509Authorities(td, []*x509.Certificate{ca.Certificate()})
	id, _, err := x509svid.ParseAndVerify([][]byte{leaf.Cert.Raw}, bundle)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(id)
	// Output: spiffe://dev.cairn.test/kms/us-east/kms-1
}

func ExampleWriteChain() {
	dir, err := os.MkdirTemp("", "devca-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	td := spiffeid.RequireTrustDomainFromString("dev.cairn.test")
	plan := devca.Plan{TrustDomain: td, Regions: []string{"local"}, Distributors: 1, RootKMS: 1, KMSPerRegion: 1, Officers: 1}

	for range 2 {
		_, written, err := devca.WriteChain(dir, plan, time.Now())
		if err != nil {
			log.Fatal(err)
		}
		for _, w := range written {
			rel, _ := filepath.Rel(dir, w.CertPath)
			fmt.Printf("%-5v %s %s\n", w.Reused, w.ID, filepath.ToSlash(rel))
		}
	}
	// Output:
	// false spiffe://dev.cairn.test/distributor/global/distributor-1 distributor/global/distributor-1/cert.pem
	// false spiffe://dev.cairn.test/rootkms/global/rootkms-1 rootkms/global/rootkms-1/cert.pem
	// false spiffe://dev.cairn.test/kms/local/kms-1 kms/local/kms-1/cert.pem
	// false spiffe://dev.cairn.test/officer/global/officer-1 officer/global/officer-1/cert.pem
	// false spiffe://dev.cairn.test/regionctl/global/regionctl regionctl/global/regionctl/cert.pem
	// false spiffe://dev.cairn.test/client/local/demo client/local/demo/cert.pem
	// true  spiffe://dev.cairn.test/distributor/global/distributor-1 distributor/global/distributor-1/cert.pem
	// true  spiffe://dev.cairn.test/rootkms/global/rootkms-1 rootkms/global/rootkms-1/cert.pem
	// true  spiffe://dev.cairn.test/kms/local/kms-1 kms/local/kms-1/cert.pem
	// true  spiffe://dev.cairn.test/officer/global/officer-1 officer/global/officer-1/cert.pem
	// true  spiffe://dev.cairn.test/regionctl/global/regionctl regionctl/global/regionctl/cert.pem
	// true  spiffe://dev.cairn.test/client/local/demo client/local/demo/cert.pem
}
