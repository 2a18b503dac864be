#!/usr/bin/perl
# Verify the DKIM signatures of the message on stdin with Mail::DKIM, asking
# only the DNS server given as HOST PORT.  Prints one line per signature
# ("ALGORITHM RESULT DOMAIN SELECTOR") and then "overall RESULT".
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;

my ($host, $port) = @ARGV;
my $resolver = Net::DNS::Resolver->new(nameservers => [$host], port => $port, recurse => 1, udp_timeout => 5);
Mail::DKIM::DNS::resolver($resolver);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\015?\012/\015\012/g;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    printf "%s %s %s %s\n", $sig->algorithm, $sig->result, $sig->domain, $sig->selector;
}
printf "overall %s\n", $dkim->result;
